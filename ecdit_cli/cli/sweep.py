"""`ecdit sweep` (spec -> study directory) and `ecdit status` (where a study stands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def sweep(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML), e.g. sweeps/demo.yaml.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Study directory [default: results/NAME].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the points (and launch script); write nothing.")] = False,
    launcher: Annotated[Optional[str], typer.Option(help="Also write launch.sh with one command per point: deepspeed or torchrun.")] = None,
    hostfile: Annotated[Optional[Path], typer.Option(help="DeepSpeed hostfile for launch.sh (multi-node).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", "-n", help="Processes per node in launch.sh.")] = 1,
) -> None:
    """Turn a study spec into compute-matched runs: one config per point and a manifest."""
    from rich.console import Console
    from rich.table import Table

    from ecdit_cli.errors import EcditError
    from ecdit_cli.numbers import si
    from ecdit_cli.study.spec import axis_names, launch_script, load_spec, make_sweep, write_study

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    if hostfile is not None and launcher is None:
        launcher = "deepspeed"
    s = load_spec(spec)
    points = make_sweep(s)
    study = out or Path("results") / s.name
    names = axis_names(s)
    table = Table(title=f"study {s.name}: {len(points)} points (match: {s.match})")
    table.add_column("run_id", no_wrap=True)
    for a in names:
        table.add_column(a, justify="right")
    for col in ("FFN width x", "params total", "params active", "FLOP/image", "train FLOP"):
        table.add_column(col, justify="right")
    for p in points:
        row = p.manifest_row(names)
        table.add_row(
            p.run_id, *[str(row[a]) if row[a] != "" else "-" for a in names],
            f"{row['dense_width_mult']:.3f}" if p.config.moe.routing == "dense" else "-",
            *(si(row[k], count=True) for k in ("params_total", "params_active", "flops_per_image", "train_flops")),
        )
    console.print(table)
    script = None
    if launcher is not None:
        if launcher not in ("deepspeed", "torchrun"):
            raise EcditError(f"--launcher {launcher!r} is invalid: allowed: deepspeed, torchrun")
        script = launch_script(points, nproc, str(hostfile) if hostfile else None, launcher)
    if dry_run:
        if script:
            console.print(script, markup=False)
        console.print(f"dry run: nothing written (would write {study})")
        return
    warnings = write_study(s, points, study)
    if script:
        from ecdit_cli import rundir
        from ecdit_cli.files import atomic_write_text

        atomic_write_text(study / rundir.LAUNCH_SCRIPT, script)
        (study / rundir.LAUNCH_SCRIPT).chmod(0o755)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", markup=True)
    console.print(f"wrote {study}/manifest.csv and {len(points)} run config(s); train with: ecdit train --sweep {study}")


def status(
    study: Annotated[Path, typer.Argument(help="Study directory (or one run directory).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """A table of the study's points: state, steps, final validation loss, wall time."""
    import json

    from rich.console import Console
    from rich.table import Table

    from ecdit_cli import rundir

    rows = rundir.status_rows(study)
    jobs = {}
    if rundir.is_study_dir(study):
        from ecdit_cli.train.slurm import job_states, read_jobs

        if read_jobs(study):  # submitit is needed only where jobs were submitted
            jobs = job_states(study)
            for r in rows:
                job = jobs.get(r["run_id"], {})
                r["job_id"], r["job_state"] = job.get("job_id"), job.get("state")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    colors = {"done": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "pending": "dim"}
    table = Table(title=f"{study}")
    table.add_column("run_id", no_wrap=True)
    job_cols = ("job", "job state") if jobs else ()
    for col in ("state", *job_cols, "steps", "val loss", "wall time", "note"):
        table.add_column(col, justify="right" if col in ("steps", "val loss", "wall time") else "left")
    for r in rows:
        steps = f"{r['step']}/{r['steps']}" if r["steps"] else "-"
        loss = f"{r['final_val_loss']:.4f}" if isinstance(r["final_val_loss"], (int, float)) else "-"
        wall = f"{r['wall_time_s'] / 60:.1f} min" if r["wall_time_s"] else "-"
        c = colors.get(r["status"], "white")
        job = (r["job_id"] or "-", r["job_state"] or "-") if jobs else ()
        table.add_row(r["run_id"], f"[{c}]{r['status']}[/]", *job, steps, loss, wall, (r["error"] or "")[:70])
    console.print(table)
    if any(j["cluster"] == "slurm" and j["state"] == "UNKNOWN" for j in jobs.values()):
        import shutil

        if shutil.which("sacct") is None:
            console.print("job states are UNKNOWN here: sacct (Slurm's accounting command) is not on this machine")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "interrupted", "failed", "pending")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
