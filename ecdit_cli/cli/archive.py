"""`ecdit archive`: keep a study's finished records in a folder that can be committed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def archive(
    study: Annotated[Path, typer.Argument(help="Study directory (from `ecdit sweep`).")],
    archive_dir: Annotated[Path, typer.Argument(metavar="ARCHIVE", help="Folder of archived run records (e.g. docs/reference/runs).")],
) -> None:
    """Sync a study with a record archive: fill pending points from it, add finished points to it.

    Only config.yaml, metrics.jsonl, summary.json and eval.json travel (never checkpoints or
    weights), so the archive can live in git and a fresh clone trains only what it lacks."""
    from ecdit_cli.study.archive import sync

    print_sync(sync(study, archive_dir), archive_dir)


def print_sync(result, archive_dir: Path, quiet_when_empty: bool = False) -> None:
    from ecdit_cli.cli.progress import console, err_console

    if quiet_when_empty and not (result.imported or result.exported or result.stale):
        return
    console.print(f"archive {archive_dir}: {len(result.imported)} point(s) taken from it, {len(result.exported)} added"
                  f" or updated, {len(result.unchanged)} already there", markup=False)
    for run_id, why in result.stale:
        err_console.print(f"  {run_id}: archived record not used ({why}); it will be trained", markup=False)
    for run_id, status in result.kept_local:
        console.print(f"  {run_id}: archived, but {status} here; its local files are kept", markup=False)
