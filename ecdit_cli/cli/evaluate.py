"""`ecdit sample` (images from a run), `ecdit eval` (GenEval on the scenes), `ecdit analyze` (routing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ecdit_cli.config.sampling import DEFAULT_CFG_SCALE, DEFAULT_GUIDANCE_MAX_T, DEFAULT_SHIFT, DEFAULT_STEPS

RunDir = Annotated[Path, typer.Argument(help="Run directory of a finished run (holds final/model.pt).")]
CfgScale = Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = none).")]
Steps = Annotated[int, typer.Option("--steps", help="Euler steps from t=1 to t=0.")]
Seed = Annotated[int, typer.Option("--seed", help="Noise seed: image j of prompt i depends only on (seed, i, j).")]
Shift = Annotated[float, typer.Option("--shift", help="Timestep shift (SD3); >1 spends more steps at high noise.")]
GuidanceMaxT = Annotated[float, typer.Option("--guidance-max-t", help="Guide only at steps with t <= this (a guidance interval; above it the conditional velocity alone); 1 = every step.")]
NoEma = Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA weights.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or auto (cuda when available).")]
CapacityFactor = Annotated[Optional[float], typer.Option(
    "--capacity-factor", help="Expert-choice runs: sample with this capacity factor instead of the trained one "
                              "(compute for quality at inference).")]

RaceMode = Annotated[Optional[str], typer.Option(
    "--race-mode", help="Race runs: 'threshold' (the learned per-layer threshold; a sample does not depend on "
                        "its batch) or 'topk' (each image's own top-k) [default: the run's moe.race_inference].")]


def _check_race_mode(mode: str | None) -> None:
    from ecdit_cli.errors import EcditError

    if mode is not None and mode not in ("threshold", "topk"):
        raise EcditError(f"--race-mode {mode!r} is invalid: allowed: threshold, topk")


def _device(name: str) -> str:
    from ecdit_cli.devices import resolve_device

    return resolve_device(name, "--device")


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    return console


def _progress(console):
    from ecdit_cli.cli.progress import count_progress

    return count_progress(console)


def _flops_line(settings: dict) -> str:
    from ecdit_cli.numbers import si

    f, fs = settings.get("capacity_factor"), settings.get("capacity_factors")
    where = f" at capacity factor {f:g}" if f is not None else ""
    where = f" at capacity factors {', '.join(f'{v:g}' for v in fs)} (per MoE layer)" if fs else where
    if settings.get("race_mode"):
        where = f" (race, {settings['race_mode']}"
        slots = settings.get("slots_per_token")
        where += f", measured {slots:.3f} experts per token)" if slots is not None else ")"
    return f"activated forward FLOPs per image{where}: {si(settings['flops_per_image'])} per denoiser pass"


def sample(
    run_dir: RunDir,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A caption (repeatable): one grid row each.")] = None,
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 4,
    cfg: CfgScale = DEFAULT_CFG_SCALE,
    steps: Steps = DEFAULT_STEPS,
    seed: Seed = 0,
    shift: Shift = DEFAULT_SHIFT,
    guidance_max_t: GuidanceMaxT = DEFAULT_GUIDANCE_MAX_T,
    no_ema: NoEma = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG grid to write; raw images go beside it as .npz (default: RUN_DIR/samples/seed<SEED>.png, seed<SEED>-f<F>.png with --capacity-factor).")] = None,
    device: Device = "auto",
    capacity_factor: CapacityFactor = None,
    race_mode: RaceMode = None,
) -> None:
    """Sample images from a trained run: a labelled PNG grid (one row per prompt) and the raw images."""
    import time

    from ecdit_cli.errors import EcditError
    from ecdit_cli.evaluate.sample import check_settings, num_batches, sample_run, save_samples

    if not prompt:
        raise EcditError('give at least one --prompt, e.g. --prompt "a red circle left of a blue square"')
    check_settings(n, cfg, steps, seed, shift, guidance_max_t)
    _check_race_mode(race_mode)
    console = _console()
    suffix = "" if capacity_factor is None else f"-f{capacity_factor:g}"
    suffix += "" if race_mode is None else f"-{race_mode}"
    target = out or Path(run_dir) / "samples" / f"seed{seed}{suffix}.png"
    if target.suffix.lower() != ".png":
        raise EcditError(f"--out must be a .png file, got {target}")
    t0 = time.time()
    with _progress(console) as progress:
        task = progress.add_task("sampling", total=steps * num_batches(len(prompt), n))
        result = sample_run(run_dir, prompt, n=n, cfg_scale=cfg, steps=steps, seed=seed, shift=shift,
                            use_ema=not no_ema, device=_device(device), capacity_factor=capacity_factor,
                            race_mode=race_mode, guidance_max_t=guidance_max_t,
                            on_step=lambda i, t: progress.update(task, advance=1),
                            on_progress=lambda done, total: progress.update(task, description=f"{done}/{total} images"))
    files = save_samples(result, target)
    count = result.images.shape[0] * result.images.shape[1]
    wall = result.settings["wall_time_s"]
    console.print(f"wrote {files['png']} and {files['npz']}: {count} image(s) in {time.time() - t0:.1f} s; "
                  f"sampling {wall:.1f} s ({wall / count:.3f} s/image at cfg {cfg:g}, {steps} steps)")
    console.print(_flops_line(result.settings))


def eval_(
    run_dir: RunDir,
    n: Annotated[int, typer.Option("-n", help="Images per prompt (GenEval: 4).")] = 4,
    cfg: CfgScale = DEFAULT_CFG_SCALE,
    steps: Steps = DEFAULT_STEPS,
    seed: Seed = 0,
    shift: Shift = DEFAULT_SHIFT,
    guidance_max_t: GuidanceMaxT = DEFAULT_GUIDANCE_MAX_T,
    per_tag: Annotated[Optional[int], typer.Option("--per-tag", help="Prompts per task tag (default: 32, i.e. 192 prompts).")] = None,
    no_ema: NoEma = False,
    device: Device = "auto",
    fd: Annotated[bool, typer.Option("--fd/--no-fd", help="Also compute FD-scenes, a Fréchet distance on a small scene network's features (not FID; its network trains once, about a minute, then is cached).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print eval.json instead of a table.")] = False,
    capacity_factor: CapacityFactor = None,
    race_mode: RaceMode = None,
) -> None:
    """GenEval on the built-in scenes, scored by the exact detector; writes RUN_DIR/eval.json and RUN_DIR/eval/."""
    from rich.table import Table

    from ecdit_cli import rundir
    from ecdit_cli.config import load_run_config
    from ecdit_cli.evaluate.eval_run import EXAMPLES_FILE, eval_paths, evaluate_run, format_fd, format_scores
    from ecdit_cli.files import to_json
    from ecdit_cli.model.accounting import trained_capacity_factor

    _check_race_mode(race_mode)
    console = _console()
    with _progress(console) as progress:
        task = progress.add_task("sampling prompts", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        def on_fd_progress(done: int, total: int) -> None:
            progress.update(task, description="training the FD-scenes network (once)", completed=done, total=total)

        doc = evaluate_run(run_dir, n=n, cfg_scale=cfg, steps=steps, seed=seed, shift=shift, per_tag=per_tag,
                           use_ema=not no_ema, device=_device(device), on_progress=on_progress, fd=fd,
                           on_fd_progress=on_fd_progress, capacity_factor=capacity_factor, race_mode=race_mode,
                           guidance_max_t=guidance_max_t)
    if as_json:
        typer.echo(to_json(doc, indent=2))
        return
    table = Table(title=f"GenEval (scenes): {doc.get('run_id', run_dir)}, {doc['num_prompts']} prompts x {n} images")
    table.add_column("task")
    table.add_column("score %", justify="right")
    for task_name, score in format_scores(doc):
        table.add_row(task_name, score, style="bold" if task_name == "overall" else None)
    fd_rows = format_fd(doc)
    if fd_rows:
        table.add_section()
        for name, value in fd_rows:
            table.add_row(name, value)
    console.print(table)
    trained = load_run_config(Path(run_dir) / rundir.CONFIG) if rundir.is_run_dir(run_dir) else None
    doc_path, folder = eval_paths(Path(run_dir), capacity_factor, trained and trained_capacity_factor(trained),
                                  race_mode, trained and trained.moe.race_inference)
    console.print(f"wrote {doc_path} and {folder}/ (examples: {EXAMPLES_FILE}; {doc['wall_time_s']:.1f} s sampling)")
    console.print(_flops_line({**doc["settings"], "flops_per_image": doc["flops_per_image"]}))


def analyze(
    run_dir: RunDir,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A caption to sample, repeatable (default: three evaluation prompts).")] = None,
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 4,
    steps: Steps = DEFAULT_STEPS,
    cfg: CfgScale = DEFAULT_CFG_SCALE,
    seed: Seed = 0,
    shift: Shift = DEFAULT_SHIFT,
    guidance_max_t: GuidanceMaxT = DEFAULT_GUIDANCE_MAX_T,
    scenes_per_tag: Annotated[int, typer.Option("--scenes-per-tag", help="Rendered scenes per task tag for the ground-truth analysis.")] = 8,
    no_ema: NoEma = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (default: RUN_DIR/analyze).")] = None,
    device: Device = "auto",
) -> None:
    """Where expert choice spends compute: heatmaps, distributions, objects vs background, specialisation."""
    from rich.table import Table

    from ecdit_cli.evaluate.allocation import analyze_run, summary_rows

    console = _console()
    with console.status("analysing routing") as status:
        doc, files = analyze_run(run_dir, out_dir=out, use_ema=not no_ema, device=_device(device), prompts=prompt,
                                 n=n, steps=steps, cfg_scale=cfg, seed=seed, shift=shift,
                                 guidance_max_t=guidance_max_t, scenes_per_tag=scenes_per_tag,
                                 on_stage=lambda s: status.update(s))
    rows = summary_rows(doc)
    if rows:
        gt = doc["ground_truth"]
        t_mid = gt["t"][len(gt["t"]) // 2]
        table = Table(title=f"{doc['run_id']}: experts per token on rendered scenes at t = {t_mid:g} "
                            f"({gt['num_scenes']} scenes; mean over all tokens "
                            f"{doc['slots_per_token_measured'] if doc.get('race_mode') else doc['slots_per_token']:g})")
        for col in ("MoE block", "object", "background", "object / bg", "CV", "max share of E"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        console.print("no rendered-scene analysis (the run was not trained on data.source=scenes)")
    folder = files["json"].parent
    console.print(f"wrote {folder}/: " + ", ".join(sorted(p.name for p in files.values())))
