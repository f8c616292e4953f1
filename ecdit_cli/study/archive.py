"""A study's record archive: the small files of its finished points, kept apart from the runs.

A long study (`make reference`) should survive an interrupted session and continue on another
machine. Checkpoints and final weights are too large to commit, but a finished point's records
(config, metrics, summary, eval scores) are all that collect, fit and plot read. The archive is
a plain folder of them, one sub-folder per run id, meant to live in git:

    ARCHIVE/<run_id>/config.yaml, metrics.jsonl, summary.json[, eval.json]

`export_done` copies every done point of a study into the archive; `import_archived` fills the
study's pending points from it, so `ecdit train --sweep` trains only what is not archived yet.
An archived record is taken only when its config is the point's config (up to keys that do not
change what is trained: the name, thread count, device); otherwise it is reported stale with
the first key that differs, and the point is trained again. A point with local progress
(running, interrupted, failed) is left alone: its own files are never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ecdit_cli import rundir
from ecdit_cli.config import config_changes, load_run_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_bytes, io_error
from ecdit_cli.lock import LockHeld, RunLock

RECORD_FILES = (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY, rundir.EVAL)
REQUIRED_FILES = (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY)
# Keys that say how a run was executed, not what it trained: an archived record made with other
# values is the same experiment.
EXECUTION_KEYS = {"name", "train.threads", "train.device", "train.compile", "data.prefetch", "train.tracker",
                  "train.wandb_mode", "train.wandb_project"}


@dataclass
class ArchiveSync:
    """What a sync did, point by point (run ids)."""

    imported: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # done here and already archived as is
    stale: list[tuple[str, str]] = field(default_factory=list)  # (run id, why the record was refused)
    kept_local: list[tuple[str, str]] = field(default_factory=list)  # (run id, local status)


def archived_ids(archive: Path) -> list[str]:
    """Run ids with a complete record in the archive, sorted."""
    if not archive.is_dir():
        return []
    return sorted(p.name for p in archive.iterdir() if all((p / f).is_file() for f in REQUIRED_FILES))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise io_error(path, err, "read") from None


def _copy_records(src: Path, dst: Path) -> bool:
    """Copy the record files present in `src` to `dst` (summary last, so a reader that sees it
    sees the rest); a file already identical is not rewritten. True when anything changed."""
    changed = False
    for name in sorted(RECORD_FILES, key=lambda n: n == rundir.SUMMARY):
        if not (src / name).is_file():
            continue
        data = _read(src / name)
        if (dst / name).is_file() and _read(dst / name) == data:
            continue
        atomic_write_bytes(dst / name, data)
        changed = True
    return changed


def _mismatch(archived: Path, run_dir: Path) -> str | None:
    """Why an archived record does not belong to the study's point, or None when it does."""
    try:
        summary = rundir.read_summary(archived) or {}
        if summary.get("status") != "done":
            return f"archived run is {summary.get('status', 'without a status')}, not done"
        changes = config_changes(load_run_config(archived / rundir.CONFIG), load_run_config(run_dir / rundir.CONFIG),
                                 EXECUTION_KEYS)
    except EcditError as err:
        return str(err)
    if changes:
        key, there, here = changes[0]
        more = f"; {len(changes) - 1} more" if len(changes) > 1 else ""
        return f"config differs ({key}: {there!r} archived, {here!r} in the study{more})"
    return None


def import_archived(study: Path, archive: Path, result: ArchiveSync | None = None) -> ArchiveSync:
    """Fill the study's pending points from the archive's matching done records."""
    result = result or ArchiveSync()
    have = set(archived_ids(archive))
    for row in rundir.read_manifest(study)[0]:
        run_id = row["run_id"]
        run_dir = study / rundir.RUNS / run_id
        if run_id not in have or not rundir.is_run_dir(run_dir):
            continue
        status = rundir.run_status(run_dir)
        if status == "done":
            continue
        if status != "pending":
            result.kept_local.append((run_id, status))
            continue
        why = _mismatch(archive / run_id, run_dir)
        if why:
            result.stale.append((run_id, why))
            continue
        try:
            with RunLock(run_dir / rundir.LOCK):  # a trainer starting this point now waits for us, or we skip
                if rundir.run_status(run_dir) != "pending":
                    continue
                _copy_records(archive / run_id, run_dir)
        except LockHeld:
            result.kept_local.append((run_id, "running"))
            continue
        result.imported.append(run_id)
    return result


def export_run(run_dir: Path, archive: Path) -> bool:
    """Archive one done run's records; True when the archive changed."""
    if rundir.run_status(run_dir) != "done":
        raise EcditError(f"{run_dir} is {rundir.run_status(run_dir)}, not done: only finished runs are archived")
    return _copy_records(run_dir, archive / run_dir.name)


def export_done(study: Path, archive: Path, result: ArchiveSync | None = None) -> ArchiveSync:
    """Archive every done point of the study whose records are not archived as they are."""
    result = result or ArchiveSync()
    for row in rundir.read_manifest(study)[0]:
        run_dir = study / rundir.RUNS / row["run_id"]
        if rundir.is_run_dir(run_dir) and rundir.run_status(run_dir) == "done":
            (result.exported if export_run(run_dir, archive) else result.unchanged).append(row["run_id"])
    return result


def sync(study: Path, archive: Path) -> ArchiveSync:
    """Import what the study lacks, then export what the archive lacks."""
    rundir.require_dir(study, "study directory")
    if archive.exists() and not archive.is_dir():
        raise EcditError(f"archive is not a directory: {archive}")
    result = import_archived(study, archive)
    return export_done(study, archive, result)
