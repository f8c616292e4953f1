"""`ecdit train`: one run (in-process or launched on N processes / nodes), or a whole study."""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ecdit_cli.cli.common import exit_with

EXIT_CODES = {"done": 0, "failed": 1, "interrupted": 130}
SET_HELP = "Override a config key, e.g. --set moe.routing=expert_choice (repeatable)."


def train(
    config: Annotated[Optional[str], typer.Argument(help="Run config YAML file, or a preset name (e.g. small).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help=SET_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory [default: results/runs/RUN_ID].")] = None,
    nproc: Annotated[int, typer.Option("--nproc", "-n", help="Processes per node (launches itself when > 1).")] = 1,
    hostfile: Annotated[Optional[Path], typer.Option(help="DeepSpeed hostfile ('host slots=N' lines) for multi-node runs.")] = None,
    ep: Annotated[Optional[int], typer.Option("--ep", help="Expert-parallel size (sets moe.ep_size).")] = None,
    launcher: Annotated[str, typer.Option(help="Launcher for --nproc > 1: deepspeed or torchrun.")] = "deepspeed",
    sweep: Annotated[Optional[Path], typer.Option("--sweep", help="Train every point of a study directory.")] = None,
    only: Annotated[Optional[str], typer.Option(help="With --sweep: run ids to train (glob patterns, comma-separated).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config, derived numbers and launch command; train nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; one line per logged step only on errors.")] = False,
) -> None:
    """Train a run on DeepSpeed (dense, token choice or expert choice); re-running resumes it."""
    from ecdit_cli.errors import EcditError

    if sweep is not None:
        if config is not None or set_:
            raise EcditError("--sweep trains the study's own configs: drop the CONFIG argument and --set")
        exit_with(_train_sweep(sweep, only, nproc, hostfile, launcher, quiet, dry_run))
        return
    if only is not None:
        raise EcditError("--only needs --sweep DIR")
    overrides = list(set_ or [])
    if ep is not None:
        overrides.append(f"moe.ep_size={ep}")
    from ecdit_cli.config import resolve_named_config

    cfg = resolve_named_config(config, overrides)
    from ecdit_cli.sweep import run_id_for_config

    cfg.name = cfg.name or run_id_for_config(cfg)
    run_dir = out or Path("results") / "runs" / cfg.name
    _check_layout(cfg, nproc, hostfile)
    if dry_run:
        _print_dry_run(cfg, run_dir, nproc, hostfile, launcher)
        return
    exit_with(EXIT_CODES[_train_one(cfg, run_dir, nproc, hostfile, launcher, quiet)])


def _check_layout(cfg, nproc: int, hostfile: Optional[Path]) -> None:
    from ecdit_cli.errors import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} is invalid: must be >= 1")
    if cfg.moe.is_moe and cfg.moe.ep_size > 1 and hostfile is None and nproc % cfg.moe.ep_size:
        raise ConfigError(
            f"moe.ep_size={cfg.moe.ep_size} is invalid with --nproc {nproc}: the expert-parallel size must "
            "divide the number of processes"
        )


def _print_dry_run(cfg, run_dir: Path, nproc: int, hostfile: Optional[Path], launcher: str) -> None:
    from rich.syntax import Syntax

    from ecdit_cli.cli.progress import console, start_lines
    from ecdit_cli.model.accounting import count
    from ecdit_cli.train.engine import batch_layout, deepspeed_config
    from ecdit_cli.train.launch import launch_command

    console.print(Syntax(cfg.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    world = nproc
    micro, accum = batch_layout(cfg, world)
    acc = count(cfg)
    info = {
        "run_id": cfg.name, "run_dir": str(run_dir), "routing": cfg.moe.routing, "steps": cfg.train.steps,
        "start_step": 0, "world_size": world, "device": cfg.train.device, "precision": cfg.train.precision,
        "zero_stage": cfg.train.zero_stage, "ep_size": cfg.moe.ep_size, "images_per_step": cfg.train.batch_size,
        "micro_batch_size": micro, "grad_accum": accum,
        "tokens_per_step": cfg.train.batch_size * cfg.model.tokens_per_image,
        "params_total": acc.params_total, "params_active": acc.params_active, "params_text": acc.params_text,
        "flops_per_image": acc.flops_per_image, "flops_per_step": 3 * acc.flops_per_image * cfg.train.batch_size,
    }
    for line in start_lines(info):
        console.print(line, markup=False)
    console.print(f"  training FLOPs budget {acc.train_flops(cfg.train.steps * cfg.train.batch_size):.3e}")
    precision = "bf16" if cfg.train.precision == "bf16" else "fp32"
    console.print(f"  DeepSpeed config: {deepspeed_config(cfg, world, precision)}", markup=False)
    if nproc > 1 or hostfile:
        cmd = launch_command(run_dir, nproc, str(hostfile) if hostfile else None, launcher)
        console.print("  launch: " + " ".join(cmd), markup=False)
    else:
        console.print("  launch: in this process", markup=False)


def _train_one(cfg, run_dir: Path, nproc: int, hostfile: Optional[Path], launcher: str, quiet: bool,
               display_progress=None) -> str:
    """Train one run; returns its final status (done / failed / interrupted)."""
    from ecdit_cli import rundir
    from ecdit_cli.cli.progress import TrainDisplay, err_console
    from ecdit_cli.config import save_config
    from ecdit_cli.errors import EcditError
    from ecdit_cli.train.launch import free_port, launch_command, run_launched
    from ecdit_cli.train.loop import TrainingFailed, TrainingInterrupted, check_resume_compatible, train

    if nproc == 1 and hostfile is None:
        try:
            with TrainDisplay(quiet=quiet, progress=display_progress) as display:
                train(cfg, run_dir, display.callbacks())
            return "done"
        except TrainingInterrupted as err:
            err_console.print(f"[yellow]{_esc(err)}[/]", markup=True)
            return "interrupted"
        except TrainingFailed as err:
            err_console.print(f"[bold red]failed:[/] {_esc(err)}", markup=True)
            return "failed"
    check_resume_compatible(cfg, run_dir)
    save_config(cfg, run_dir / rundir.CONFIG)
    cmd = launch_command(run_dir, nproc, str(hostfile) if hostfile else None, launcher,
                         master_port=free_port(), worker_args=["--quiet"] if quiet else None)
    code = run_launched(cmd)
    if code == 0:
        return "done"
    if code == 130 or rundir.run_status(run_dir) == "interrupted":
        return "interrupted"
    if rundir.run_status(run_dir) != "failed":
        from ecdit_cli.train.loop import _write_failed

        _write_failed(run_dir, cfg, f"launcher exited with code {code} (see the output above)")
    if code == 2:
        raise EcditError(f"training of {run_dir} stopped on bad input (see the message above)")
    return "failed"


def _esc(err: Exception) -> str:
    from rich.markup import escape

    return escape(str(err))


def _train_sweep(study: Path, only: Optional[str], nproc: int, hostfile: Optional[Path], launcher: str,
                 quiet: bool, dry_run: bool) -> int:
    from rich.progress import Progress

    from ecdit_cli import rundir
    from ecdit_cli.cli.progress import console, err_console, make_progress
    from ecdit_cli.config import load_run_config
    from ecdit_cli.errors import EcditError
    from ecdit_cli.sweep import read_manifest

    rundir.require_dir(study, "study directory")
    rows = read_manifest(study)
    ids = [r["run_id"] for r in rows]
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        ids = [i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)]
        if not ids:
            raise EcditError(f"--only {only!r} matches no run id of {study} (ids look like {rows[0]['run_id']})")
    todo = []
    for run_id in ids:
        run_dir = study / rundir.RUNS / run_id
        if not rundir.is_run_dir(run_dir):
            raise EcditError(f"{run_dir} has no config.yaml: regenerate the study with `ecdit sweep`")
        todo.append((run_id, run_dir, rundir.run_status(run_dir)))
    pending = [t for t in todo if t[2] != "done"]
    console.print(f"study {study}: {len(todo)} point(s), {len(todo) - len(pending)} done, {len(pending)} to train")
    if dry_run:
        for run_id, _, status in todo:
            console.print(f"  {run_id}: {status}", markup=False)
        return 0
    failed, t0 = [], time.time()
    plain = quiet or not console.is_terminal
    progress: Optional[Progress] = None if plain else make_progress()
    overall = None
    if progress is not None:
        progress.start()
        overall = progress.add_task("study", total=len(todo), completed=len(todo) - len(pending), loss="", ips="")
    try:
        for i, (run_id, run_dir, status) in enumerate(pending):
            if plain and not quiet:
                console.print(f"[{i + 1}/{len(pending)}] {run_id} ({status})", markup=False)
            cfg = load_run_config(run_dir)
            try:
                result = _train_one(cfg, run_dir, nproc, hostfile, launcher, quiet, display_progress=progress)
            except EcditError as err:
                from ecdit_cli.train.loop import _write_failed

                _write_failed(run_dir, cfg, str(err))
                err_console.print(f"[bold red]{run_id} failed:[/] {_esc(err)}", markup=True)
                result = "failed"
            if result == "interrupted":
                err_console.print(f"study interrupted; resume with: ecdit train --sweep {study}")
                return 130
            if result == "failed":
                failed.append(run_id)
            if overall is not None:
                progress.update(overall, advance=1)
    finally:
        if progress is not None:
            progress.stop()
    took = time.time() - t0
    if failed:
        err_console.print(f"{len(failed)} point(s) failed: {', '.join(failed)} (see `ecdit status {study}`)")
        return 1
    console.print(f"study {study}: all {len(todo)} point(s) done ({took / 60:.1f} min this session)")
    return 0
