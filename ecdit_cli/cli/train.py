"""`ecdit train`: one run (in-process or launched on N processes / nodes), or a whole study."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ecdit_cli.cli.common import exit_with

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
    archive: Annotated[Optional[Path], typer.Option(help="With --sweep: record archive (see `ecdit archive`): take its finished points, add each point that finishes.")] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="With --sweep: submit one job per pending point (a job array, through submitit) instead of training here.")] = False,
    cluster: Annotated[str, typer.Option(help="With --slurm: slurm (sbatch), or local (the same jobs as processes on this machine).")] = "slurm",
    partition: Annotated[Optional[str], typer.Option(help="With --slurm: the Slurm partition.")] = None,
    gpus_per_node: Annotated[int, typer.Option(help="With --slurm: GPUs per job and node, one process each (0: a CPU job of --nproc processes).")] = 0,
    nodes: Annotated[int, typer.Option(help="With --slurm: nodes per job (more than 1: one torchrun per node).")] = 1,
    time_limit: Annotated[int, typer.Option("--time", help="With --slurm: time limit per job in minutes (a run that reaches it checkpoints; submit again to resume).")] = 240,
    cpus_per_task: Annotated[Optional[int], typer.Option(help="With --slurm: CPUs per job and node.")] = None,
    max_parallel: Annotated[Optional[int], typer.Option(help="With --slurm: jobs at once (Slurm: the array's limit; local: waves of this many) [default: Slurm's, 1 locally].")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="With --slurm: wait for the jobs and report their points [default: wait with --cluster local only].")] = None,
) -> None:
    """Train a run on DeepSpeed (dense, token choice or expert choice); re-running resumes it."""
    from ecdit_cli.errors import EcditError

    slurm_only = {"--cluster": cluster != "slurm", "--partition": partition is not None,
                  "--gpus-per-node": gpus_per_node != 0, "--nodes": nodes != 1, "--time": time_limit != 240,
                  "--cpus-per-task": cpus_per_task is not None, "--max-parallel": max_parallel is not None,
                  "--wait/--no-wait": wait is not None}
    if not slurm and any(slurm_only.values()):
        raise EcditError(f"{next(k for k, v in slurm_only.items() if v)} needs --slurm (with --sweep DIR)")
    if sweep is not None:
        if config is not None or set_:
            raise EcditError("--sweep trains the study's own configs: drop the CONFIG argument and --set")
        if slurm:
            from ecdit_cli.train.slurm import SlurmOptions

            if archive is not None or hostfile is not None:
                raise EcditError(f"{'--archive' if archive is not None else '--hostfile'} cannot be combined with "
                                 "--slurm (Slurm places the jobs; archive the study when they are done)")
            opts = SlurmOptions(cluster=cluster, partition=partition, gpus_per_node=gpus_per_node, nodes=nodes,
                                time_min=time_limit, cpus_per_task=cpus_per_task, nproc=nproc, launcher=launcher,
                                max_parallel=max_parallel)
            if cluster == "local" and wait is False:
                raise EcditError("--no-wait needs --cluster slurm: local jobs are this command's own processes")
            exit_with(_submit_sweep(sweep, only, opts, dry_run, cluster == "local" if wait is None else wait))
            return
        exit_with(_train_sweep(sweep, only, nproc, hostfile, launcher, quiet, dry_run, archive))
        return
    if slurm:
        raise EcditError("--slurm needs --sweep DIR")
    if only is not None or archive is not None:
        raise EcditError(f"{'--only' if only is not None else '--archive'} needs --sweep DIR")
    overrides = list(set_ or [])
    if ep is not None:
        overrides.append(f"moe.ep_size={ep}")
    from ecdit_cli.config import resolve_named_config
    from ecdit_cli.study.spec import run_id_for_config
    from ecdit_cli.train.driver import check_layout

    cfg = resolve_named_config(config, overrides)
    cfg.name = cfg.name or run_id_for_config(cfg)
    run_dir = out or Path("results") / "runs" / cfg.name
    check_layout(cfg, nproc, hostfile)
    if dry_run:
        _print_dry_run(cfg, run_dir, nproc, hostfile, launcher)
        return
    exit_with(_train_one(cfg, run_dir, nproc, hostfile, launcher, quiet).exit_code)


def _print_dry_run(cfg, run_dir: Path, nproc: int, hostfile: Optional[Path], launcher: str) -> None:
    from rich.syntax import Syntax

    from ecdit_cli.cli.progress import console, start_lines
    from ecdit_cli.train.driver import plan

    p = plan(cfg, run_dir, nproc, hostfile, launcher)
    console.print(Syntax(cfg.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    for line in start_lines(p["info"]):
        console.print(line, markup=False)
    console.print(f"  training FLOPs budget {p['train_flops']:.3e}")
    console.print(f"  DeepSpeed config: {p['deepspeed_config']}", markup=False)
    console.print("  launch: " + (" ".join(p["launch"]) if p["launch"] else "in this process"), markup=False)


def _train_one(cfg, run_dir: Path, nproc: int, hostfile: Optional[Path], launcher: str, quiet: bool,
               display_progress=None):
    """Train one run with a progress display; prints why it stopped unless it is done."""
    from ecdit_cli.cli.progress import TrainDisplay, err_console
    from ecdit_cli.train.driver import train_one

    with TrainDisplay(quiet=quiet, progress=display_progress) as display:
        outcome = train_one(cfg, run_dir, nproc, hostfile, launcher, quiet, display.callbacks())
    if outcome.status == "interrupted":
        err_console.print(f"[yellow]{_esc(outcome.message)}[/]", markup=True)
    elif outcome.status == "failed":
        err_console.print(f"[bold red]failed:[/] {_esc(outcome.message)}", markup=True)
    return outcome


def _esc(msg: str) -> str:
    from rich.markup import escape

    return escape(msg)


def _submit_sweep(study: Path, only: Optional[str], opts, dry_run: bool, wait: bool) -> int:
    """Submit the pending points as jobs; with `wait`, wait for them and report as a sweep does."""
    from ecdit_cli import rundir
    from ecdit_cli.cli.progress import console, err_console
    from ecdit_cli.train.driver import EXIT_CODES
    from ecdit_cli.train.slurm import JOBS_FILE, submit

    def submitted(jobs: dict[str, str]) -> None:
        for run_id, job_id in jobs.items():
            console.print(f"  {run_id}: job {job_id}", markup=False)

    plan = submit(study, opts, only, dry_run=True)  # what to submit, before anything starts
    console.print(f"study {study}: {len(plan.done)} done, {len(plan.held)} held, {len(plan.submitted)} to submit "
                  f"({opts.cluster}: " + ", ".join(f"{k}={v}" for k, v in plan.parameters.items()) + ")", markup=False)
    for run_id, why in plan.held.items():
        console.print(f"  {run_id}: held ({why})", markup=False)
    if dry_run:
        for run_id in plan.submitted:
            console.print(f"  {run_id}: would be submitted", markup=False)
        return 0
    sub = submit(study, opts, only, on_submit=submitted)
    if sub.submitted:
        console.print(f"job ids in {study / JOBS_FILE}; follow them with: ecdit status {study}", markup=False)
    if not wait or not sub.jobs:
        return 0
    for job in sub.jobs:
        job.wait()
    states = {run_id: rundir.run_status(study / rundir.RUNS / run_id) for run_id in sub.submitted}
    bad = [r for r, s in states.items() if s in ("failed", "interrupted", "pending")]
    if bad:
        err_console.print(f"{len(bad)} point(s) not done: {', '.join(bad)} (see `ecdit status {study}` and "
                          f"{study / 'slurm' / 'logs'})", markup=False)
        return EXIT_CODES["failed"]
    console.print(f"study {study}: {len(states)} submitted point(s) done", markup=False)
    return 0


def _train_sweep(study: Path, only: Optional[str], nproc: int, hostfile: Optional[Path], launcher: str,
                 quiet: bool, dry_run: bool, archive: Optional[Path] = None) -> int:
    from ecdit_cli.cli.archive import print_sync
    from ecdit_cli.cli.progress import console, err_console, make_progress
    from ecdit_cli.study import archive as records
    from ecdit_cli.train.driver import study_exit_code, study_points, train_points

    if archive is not None and not dry_run:
        print_sync(records.import_archived(study, archive), archive, quiet_when_empty=True)
    points = study_points(study, only)
    pending = [p for p in points if p.status != "done"]
    console.print(f"study {study}: {len(points)} point(s), {len(points) - len(pending)} done, {len(pending)} to train")
    if dry_run:
        for p in points:
            console.print(f"  {p.run_id}: {p.status}", markup=False)
        return 0
    t0 = time.time()
    plain = quiet or not console.is_terminal
    progress = None if plain else make_progress()
    overall = None
    if progress is not None:
        progress.start()
        overall = progress.add_task("study", total=len(points), completed=len(points) - len(pending), loss="", ips="")
    def train_point(point, cfg):
        if plain and not quiet:
            console.print(f"[{pending.index(point) + 1}/{len(pending)}] {point.run_id} ({point.status})", markup=False)
        return _train_one(cfg, point.run_dir, nproc, hostfile, launcher, quiet, display_progress=progress)

    outcomes, failed, skipped = [], [], []
    try:
        for point, outcome in train_points(points, train_point):
            outcomes.append(outcome)
            if outcome.status == "skipped":
                skipped.append(point.run_id)
            if archive is not None and outcome.status == "done":
                records.export_run(point.run_dir, archive)
            if outcome.status == "failed":
                failed.append(point.run_id)
                if outcome.bad_input:  # other failures were printed as they happened
                    err_console.print(f"[bold red]{point.run_id} failed:[/] {_esc(outcome.message)}", markup=True)
            if overall is not None:
                progress.update(overall, advance=1)
    finally:
        if progress is not None:
            progress.stop()
    if archive is not None:
        records.export_done(study, archive)  # also the points this process did not train
    code = study_exit_code(outcomes)
    if code == 130:
        err_console.print(f"study interrupted; resume with: ecdit train --sweep {study}")
    elif failed:
        err_console.print(f"{len(failed)} point(s) failed: {', '.join(failed)} (see `ecdit status {study}`)")
    elif skipped:
        console.print(f"study {study}: {len(points) - len(skipped)} point(s) done, {len(skipped)} trained by "
                      f"another process ({(time.time() - t0) / 60:.1f} min this session)")
    else:
        console.print(f"study {study}: all {len(points)} point(s) done ({(time.time() - t0) / 60:.1f} min this session)")
    return code
