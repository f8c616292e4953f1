"""Training runs and studies as the CLI asks for them: in this process or launched, one or many.

`train_one` trains one run, in-process (one process) or through the DeepSpeed/torchrun launcher
(`--nproc` > 1 or a hostfile), and returns its outcome; `study_points` and `train_points` walk
a study's manifest, training every point that is not done. `plan` is what `--dry-run` prints.
Exit codes: done 0, failed 1, interrupted 130 (as a shell reports SIGINT), bad input 2.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecdit_cli import rundir
from ecdit_cli.config import RunConfig, load_run_config, save_config
from ecdit_cli.errors import ConfigError, EcditError
from ecdit_cli.lock import LockHeld
from ecdit_cli.train.records import (
    Callbacks,
    TrainingFailed,
    TrainingInterrupted,
    check_init_source,
    check_resume_compatible,
    start_info,
    write_failed,
)

# "skipped": a point another live trainer of the same study holds; it does not fail the study.
EXIT_CODES = {"done": 0, "skipped": 0, "failed": 1, "interrupted": 130}


@dataclass
class RunOutcome:
    status: str  # done, failed, interrupted or skipped (held by another trainer)
    message: str = ""  # why it failed or stopped ('' when done)
    bad_input: bool = False  # failed before training, on an error in its config or files

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def check_layout(cfg: RunConfig, nproc: int, hostfile: str | Path | None) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} is invalid: must be >= 1")
    if cfg.moe.is_moe and cfg.moe.ep_size > 1 and hostfile is None and nproc % cfg.moe.ep_size:
        raise ConfigError(
            f"moe.ep_size={cfg.moe.ep_size} is invalid with --nproc {nproc}: the expert-parallel size must "
            "divide the number of processes"
        )


def plan(cfg: RunConfig, run_dir: Path, nproc: int = 1, hostfile: str | Path | None = None,
         launcher: str = "deepspeed") -> dict[str, Any]:
    """What a run would do, without building it: the numbers `train` would log at its start,
    the DeepSpeed config it would pass and the launch command (None: in this process)."""
    from ecdit_cli.devices import resolve_device
    from ecdit_cli.model.accounting import count, vocab_size
    from ecdit_cli.train.engine import batch_layout, deepspeed_config, resolve_precision
    from ecdit_cli.train.launch import launch_command

    check_layout(cfg, nproc, hostfile)
    device = resolve_device(cfg.train.device, "train.device")
    precision = resolve_precision(cfg, device)
    micro, accum = batch_layout(cfg, nproc)
    acc = count(cfg, vocab_size(cfg))  # the vocabulary sizes the learned text encoder, as in the run
    info = start_info(cfg, acc, run_dir=run_dir, run_id=cfg.name, start_step=0, world_size=nproc, micro=micro,
                      accum=accum, device=device, precision=precision)
    launched = nproc > 1 or hostfile is not None
    return {
        "info": info,
        "train_flops": acc.train_flops(cfg.train.steps * cfg.train.batch_size),
        "deepspeed_config": deepspeed_config(cfg, nproc, precision),
        "launch": launch_command(run_dir, nproc, str(hostfile) if hostfile else None, launcher) if launched else None,
    }


def train_one(cfg: RunConfig, run_dir: Path, nproc: int = 1, hostfile: str | Path | None = None,
              launcher: str = "deepspeed", quiet: bool = False, callbacks: Callbacks | None = None) -> RunOutcome:
    """Train one run (resuming it); bad input raises EcditError, anything else is an outcome."""
    from ecdit_cli.train.launch import free_port, launch_command, run_launched
    from ecdit_cli.train.loop import train

    check_layout(cfg, nproc, hostfile)
    if nproc == 1 and hostfile is None:
        try:
            train(cfg, run_dir, callbacks)
            return RunOutcome("done")
        except TrainingInterrupted as err:
            return RunOutcome("interrupted", str(err))
        except TrainingFailed as err:
            return RunOutcome("failed", str(err))
    check_resume_compatible(cfg, run_dir)
    check_init_source(cfg, run_dir)
    save_config(cfg, run_dir / rundir.CONFIG)
    cmd = launch_command(run_dir, nproc, str(hostfile) if hostfile else None, launcher,
                         master_port=free_port(), worker_args=["--quiet"] if quiet else None)
    return launched_outcome(cfg, run_dir, run_launched(cmd))


def launched_outcome(cfg: RunConfig, run_dir: Path, code: int, mark_failed: bool = True) -> RunOutcome:
    """The outcome of a launched run from its launcher's exit code (and its summary)."""
    if code == 0:
        return RunOutcome("done")
    if code == 130 or rundir.run_status(run_dir) == "interrupted":
        return RunOutcome("interrupted", f"training of {run_dir} was interrupted")
    message = f"launcher exited with code {code} (see the output above)"
    if mark_failed and rundir.run_status(run_dir) != "failed":
        write_failed(run_dir, cfg, message)
    if code == 2:
        raise EcditError(f"training of {run_dir} stopped on bad input (see the message above)")
    return RunOutcome("failed", message)


@dataclass
class StudyPoint:
    run_id: str
    run_dir: Path
    status: str  # as `ecdit status` shows it: pending, running, interrupted, failed, done


def study_points(study: Path, only: str | None = None) -> list[StudyPoint]:
    """The study's points in manifest order, narrowed to the run ids matching `only` (globs, comma-separated)."""
    rundir.require_dir(study, "study directory")
    rows, _ = rundir.read_manifest(study)
    ids = [r["run_id"] for r in rows]
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        ids = [i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)]
        if not ids:
            example = rows[0]["run_id"] if rows else "none: the manifest is empty"
            raise EcditError(f"--only {only!r} matches no run id of {study} (ids look like {example})")
    points = []
    for run_id in ids:
        run_dir = study / rundir.RUNS / run_id
        if not rundir.is_run_dir(run_dir):
            raise EcditError(f"{run_dir} has no config.yaml: regenerate the study with `ecdit sweep`")
        points.append(StudyPoint(run_id, run_dir, rundir.run_status(run_dir)))
    return points


def train_points(points: list[StudyPoint], train_point: Callable[[StudyPoint, RunConfig], RunOutcome]
                 ) -> Iterator[tuple[StudyPoint, RunOutcome]]:
    """Train each point that is not done with `train_point`, yielding its outcome; stops after
    an interrupted one. A point that fails on bad input is marked failed and the study goes on.

    Several trainers may share one study (`make reference` runs two): a point is re-checked
    just before it starts, and one that another live process holds (its lock) is passed over
    with the outcome "skipped", its files untouched."""
    for point in points:
        if point.status == "done":
            continue
        point.status = rundir.run_status(point.run_dir)  # another trainer may have moved it on
        if point.status == "done" or (point.status == "running" and rundir.lock_is_held(point.run_dir)):
            yield point, RunOutcome("skipped", "trained by another process")
            continue
        cfg = load_run_config(point.run_dir)
        try:
            outcome = train_point(point, cfg)
        except LockHeld as err:  # lost the race for the lock to another trainer
            outcome = RunOutcome("skipped", str(err))
        except EcditError as err:
            write_failed(point.run_dir, cfg, str(err))
            outcome = RunOutcome("failed", str(err), bad_input=True)
        yield point, outcome
        if outcome.status == "interrupted":
            return


def study_exit_code(outcomes: list[RunOutcome]) -> int:
    if any(o.status == "interrupted" for o in outcomes):
        return EXIT_CODES["interrupted"]
    return EXIT_CODES["failed"] if any(o.status == "failed" for o in outcomes) else EXIT_CODES["done"]
