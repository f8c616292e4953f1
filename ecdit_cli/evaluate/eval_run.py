"""`ecdit eval`: GenEval on the built-in scenes for a trained run; sample, score, write eval.json.

Mirrors GenEval (Ghosh et al. 2023, djghosh13/geneval; docs/data.md): the fixed prompt set of
`geneval.make_prompt_set` (six tags, drawn with a fixed seed so every run and every sampling
seed sees the same prompts), `n` images per prompt (GenEval uses 4), each checked by the exact
scene detector (`data/detector.py`); a tag's score is its share of correct images and
`overall` the unweighted mean of the six tag scores (`geneval.score_images`).

Files (run directory):

    eval/prompts.jsonl   the prompt records, GenEval's metadata format (written first)
    eval/images.npz      every sampled image: `images` (P, N, H, W, 3) uint8, `prompts`
    eval/results.jsonl   one line per image: prompt_index, image_index, tag, prompt, correct, reason
    eval/examples.png    example images per tag with pass/fail borders and the detector's reason
    eval.json            the scores (keys below), written atomically and last

With `fd=True` (the default) eval.json also holds FD-scenes (`fd_scenes.py`): the Fréchet distance of
the generated images to rendered scenes of the same prompts on a small scene network's
features (`fd_scenes`, lower is better; not FID), and the floor of two rendered sets
(`fd_scenes_floor`).

An interrupted evaluation leaves the previous eval.json untouched (never half-written); it
does not resume.

`capacity_factor` evaluates an expert-choice run at another capacity than it was trained with
(`ecdit eval --capacity-factor F`); its files then go to `eval_fF/` and `eval_fF.json`, so the
run's own eval.json (what a study collects) keeps the trained capacity. Every eval.json records
the capacity factor it sampled with and the activated forward FLOPs per image (one denoiser
pass; a guided sampling step costs two). A race run's experts per token vary at inference, so
its FLOPs are measured over every forward pass of the eval (`slots_per_token`, `race_mode`);
`race_mode` topk (`ecdit eval --race-mode topk`, when the run infers by threshold) writes to
`eval_topk/` and `eval_topk.json`.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecdit_cli import __version__, rundir
from ecdit_cli.data.scenes import TAGS
from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate import geneval
from ecdit_cli.evaluate import sample as sampling
from ecdit_cli.figures import figure_bytes
from ecdit_cli.files import atomic_write_bytes, atomic_write_json, atomic_write_text, npz_bytes, to_json
from ecdit_cli.model.accounting import trained_capacity_factor

EVAL_DIR = "eval"
PROMPTS_FILE = "prompts.jsonl"
IMAGES_FILE = "images.npz"
RESULTS_FILE = "results.jsonl"
EXAMPLES_FILE = "examples.png"
DEFAULT_IMAGES_PER_PROMPT = 4  # GenEval's setting
PROMPT_SET_SEED = 0  # the prompt set is fixed; --seed changes only the sampling noise
EXAMPLES_PER_TAG = 6


def check_scenes_run(cfg) -> None:
    """GenEval needs the scenes' exact detector: runs trained on `data.source=scenes` qualify, and
    runs on a prepared cache (which may hold rendered scenes, as the README's example does; on
    other images the detector's verdicts say little)."""
    if cfg.data.source not in ("scenes", "prepared"):
        raise EcditError(f"eval scores images of the built-in scenes; this run was trained on "
                         f"data.source={cfg.data.source} (use `ecdit sample` to look at its images)")
    if cfg.model.space == "pixel" and cfg.model.in_channels != 3:
        raise EcditError(f"eval needs RGB images; this run has model.in_channels={cfg.model.in_channels}")


def eval_model(
    model,
    cfg,
    n: int = DEFAULT_IMAGES_PER_PROMPT,
    cfg_scale: float = sampling.DEFAULT_CFG_SCALE,
    steps: int = sampling.DEFAULT_STEPS,
    seed: int = 0,
    shift: float = sampling.DEFAULT_SHIFT,
    per_tag: int | dict[str, int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    batch_size: int = sampling.DEFAULT_BATCH_SIZE,
    records: Sequence[dict[str, Any]] | None = None,
    guidance_max_t: float = sampling.DEFAULT_GUIDANCE_MAX_T,
) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, Any]]:
    """(prompt records, images (P, N, H, W, 3) in [0, 1], `geneval.score_images` result).

    The prompts are the fixed set for `per_tag` unless `records` are given. on_progress(
    prompts_done, prompts_total) follows the sampling, one call per batch.
    """
    check_scenes_run(cfg)
    records = list(records) if records is not None else geneval.make_prompt_set(PROMPT_SET_SEED, per_tag)
    if not records:
        raise EcditError("the prompt set is empty: --per-tag must be >= 1")
    progress = None
    if on_progress is not None:
        def progress(done: int, total: int) -> None:
            on_progress(done // n, len(records))
    result = sampling.sample_images(model, cfg, [r["prompt"] for r in records], n, cfg_scale, steps, seed, shift,
                                    batch_size=batch_size, on_progress=progress, guidance_max_t=guidance_max_t)
    images = np.asarray(result.images)
    scores = geneval.score_images(records, [list(imgs) for imgs in images])
    return records, images, scores


def eval_json(scores: dict[str, Any], settings: dict[str, Any], num_prompts: int, **extra: Any) -> dict[str, Any]:
    """The eval.json document (what `collect` reads: overall, tasks, prompts_with_any_correct)."""
    return {
        "overall": scores["overall"],
        "tasks": scores["tags"],
        "prompts_with_any_correct": scores["prompts_with_any_correct"],
        "heldout": scores["heldout"],
        "num_images": scores["num_images"],
        "num_prompts": num_prompts,
        "missing_tags": scores["missing_tags"],
        "settings": settings,
        "ecdit_version": __version__,
        **extra,
    }


def evaluate_run(
    run_dir: str | Path,
    n: int = DEFAULT_IMAGES_PER_PROMPT,
    cfg_scale: float = sampling.DEFAULT_CFG_SCALE,
    steps: int = sampling.DEFAULT_STEPS,
    seed: int = 0,
    shift: float = sampling.DEFAULT_SHIFT,
    per_tag: int | None = None,
    use_ema: bool = True,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    batch_size: int = sampling.DEFAULT_BATCH_SIZE,
    fd: bool = True,
    on_fd_progress: Callable[[int, int], None] | None = None,
    capacity_factor: float | None = None,
    race_mode: str | None = None,
    guidance_max_t: float = sampling.DEFAULT_GUIDANCE_MAX_T,
) -> dict[str, Any]:
    """Evaluate a finished run and write its files (module docstring); returns eval.json's content.

    on_fd_progress(step, steps) follows the training of the FD-scenes network when it is not cached.
    """
    from ecdit_cli.config import load_run_config
    from ecdit_cli.model.load import load_run

    run_dir = rundir.require_dir(run_dir, "run directory")
    sampling.check_settings(n, cfg_scale, steps, seed, shift, guidance_max_t)
    if per_tag is not None and per_tag < 1:
        raise EcditError(f"--per-tag must be >= 1, got {per_tag}")
    if rundir.is_run_dir(run_dir):
        check_scenes_run(load_run_config(run_dir / rundir.CONFIG))  # fail before loading weights
    trained = load_run_config(run_dir / rundir.CONFIG) if rundir.is_run_dir(run_dir) else None
    model, cfg = load_run(run_dir, use_ema=use_ema, device=device, capacity_factor=capacity_factor,
                          race_mode=race_mode)
    check_scenes_run(cfg)
    per_tag_n = geneval.DEFAULT_PER_TAG if per_tag is None else int(per_tag)
    doc_path, out = eval_paths(run_dir, capacity_factor, trained and trained_capacity_factor(trained), race_mode,
                               trained and trained.moe.race_inference)
    records = geneval.make_prompt_set(PROMPT_SET_SEED, per_tag_n)
    geneval.write_prompts(out / PROMPTS_FILE, records)
    t0 = time.time()
    with sampling.measure_slots(model) as meter:
        records, images, scores = eval_model(model, cfg, n, cfg_scale, steps, seed, shift, per_tag_n, on_progress,
                                             batch_size, records, guidance_max_t)
    wall = time.time() - t0
    settings = {"cfg": float(cfg_scale), "steps": int(steps), "seed": int(seed), "n": int(n), "per_tag": per_tag_n,
                "ema": bool(use_ema and cfg.train.ema_decay > 0), "shift": float(shift),
                "guidance_max_t": float(guidance_max_t), "prompt_set_seed": PROMPT_SET_SEED}
    extra: dict[str, Any] = {}
    if fd:
        extra = fd_scores(images, records, on_fd_progress)
    routing = sampling.routing_settings(cfg, meter)
    flops = routing.pop("flops_per_image")
    settings.update(routing)
    write_eval_files(out, records, images, scores["images"])
    doc = eval_json(scores, settings, len(records), run_id=cfg.name or run_dir.name, wall_time_s=wall,
                    flops_per_image=flops, **extra)
    atomic_write_json(doc_path, doc)  # last: its presence means the eval finished
    return doc


def eval_paths(run_dir: Path, capacity_factor: float | None, trained: float | None, race_mode: str | None = None,
               trained_race_mode: str | None = None) -> tuple[Path, Path]:
    """(eval.json, eval/) of a run, or (eval_fF.json, eval_fF/) at a capacity it was not trained with,
    or (eval_topk.json, eval_topk/) for a race run in the inference mode its config does not name."""
    if race_mode is not None and race_mode != (trained_race_mode or "threshold"):
        return run_dir / f"{EVAL_DIR}_{race_mode}.json", run_dir / f"{EVAL_DIR}_{race_mode}"
    if capacity_factor is None or (trained is not None and float(capacity_factor) == float(trained)):
        return run_dir / rundir.EVAL, run_dir / EVAL_DIR
    tag = f"{EVAL_DIR}_f{float(capacity_factor):g}"
    return run_dir / f"{tag}.json", run_dir / tag


def fd_scores(images: np.ndarray, records: Sequence[dict[str, Any]],
              on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """eval.json's FD-scenes keys for images (P, N, H, W, 3) of the prompt records."""
    from ecdit_cli.evaluate import fd_scenes as fd

    trained = fd.load_scene_net(images.shape[2], on_progress)
    return {**fd.fd_scenes(trained.net, images, list(records)),
            "fd_net": {"version": fd.NET_VERSION, "image_size": trained.size,
                       "val_shape_acc": trained.val_shape_acc, "val_color_acc": trained.val_color_acc,
                       "val_occupancy_acc": trained.val_occupancy_acc}}


def write_eval_files(out: Path, records: Sequence[dict[str, Any]], images: np.ndarray,
                     per_image: Sequence[dict[str, Any]]) -> None:
    """images.npz, results.jsonl and examples.png into `out` (each atomically)."""
    images_u8 = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    atomic_write_bytes(out / IMAGES_FILE, npz_bytes(images=images_u8,
                                                             prompts=np.asarray([r["prompt"] for r in records])))
    atomic_write_text(out / RESULTS_FILE, "".join(to_json(r) + "\n" for r in per_image))
    atomic_write_bytes(out / EXAMPLES_FILE, figure_bytes(examples_figure(records, images, per_image)))


def examples_figure(records: Sequence[dict[str, Any]], images: np.ndarray, per_image: Sequence[dict[str, Any]],
                    per_tag: int = EXAMPLES_PER_TAG):
    """One row per tag: the first image of its first prompts, framed green (correct) or red, with
    the prompt above and the detector's verdict below."""
    from matplotlib.figure import Figure

    verdict = {(r["prompt_index"], r["image_index"]): r for r in per_image}
    tags = [t for t in TAGS if any(r["tag"] == t for r in records)]
    rows = {t: [i for i, r in enumerate(records) if r["tag"] == t][:per_tag] for t in tags}
    ncols = max(1, max((len(v) for v in rows.values()), default=1))
    fig = Figure(figsize=(max(6.0, 1.75 * ncols + 0.9), 2.15 * max(1, len(tags)) + 0.5), layout="constrained")
    axes = fig.subplots(max(1, len(tags)), ncols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, tag in enumerate(tags):
        axes[row][0].text(-0.12, 0.5, tag.replace("_", " "), transform=axes[row][0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=9, fontweight="bold")
        for col, p in enumerate(rows[tag]):
            ax = axes[row][col]
            ax.axis("on")
            sampling.show_image(ax, images[p, 0])
            v = verdict.get((p, 0), {"correct": False, "reason": "not scored"})
            color = "#1a9641" if v["correct"] else "#d7191c"
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(color)
                spine.set_linewidth(3)
            ax.set_title("\n".join(textwrap.wrap(records[p]["prompt"], 22)), fontsize=7)
            mark = "✓ correct" if v["correct"] else "✗ " + (v["reason"] or "wrong")
            ax.set_xlabel("\n".join(textwrap.wrap(mark, 26)[:3]), fontsize=6.5, color=color)
    correct = sum(bool(r["correct"]) for r in per_image)
    fig.suptitle(f"GenEval examples: image 0 of each prompt\n{correct}/{len(per_image)} images correct overall "
                 "(green: detector accepts; red: rejects, with its reason)", fontsize=9)
    return fig


def format_scores(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, percent) rows in GenEval's order, then overall, any-correct and held-out."""
    rows = [(t, f"{100 * doc['tasks'][t]:.1f}") for t in TAGS if t in doc.get("tasks", {})]
    rows.append(("overall", f"{100 * doc['overall']:.1f}" if doc.get("overall") is not None else "-"))
    rows.append(("prompts with any correct", f"{100 * doc['prompts_with_any_correct']:.1f}"))
    if doc.get("heldout") is not None:
        rows.append(("held-out captions", f"{100 * doc['heldout']:.1f}"))
    return rows


def format_fd(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of FD-scenes, empty when the eval ran without it."""
    if doc.get("fd_scenes") is None:
        return []
    return [("FD-scenes (lower is better; not FID)", f"{doc['fd_scenes']:.1f}"),
            ("FD-scenes floor (rendered vs rendered)", f"{doc['fd_scenes_floor']:.1f}")]


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    """A run's eval.json (an EcditError when it has none)."""
    from ecdit_cli.files import read_json

    return read_json(Path(run_dir) / rundir.EVAL, what="eval results")

