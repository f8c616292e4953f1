"""The run directory and the study directory: the file layout every command agrees on.

Run directory (written by `ecdit train`, read by collect/plot/sample/eval/analyze):

    config.yaml       the fully resolved RunConfig (format_version inside)
    metrics.jsonl     one JSON object per line; "kind" is "train" or "val" (fields below)
    summary.json      written atomically, last: status, final losses, steps, wall time, counts
    checkpoints/      DeepSpeed checkpoints (`latest` pointer written atomically)
    final/model.pt    consolidated weights (model + EMA + tokenizer vocabulary + config), no DeepSpeed needed
    train.log         plain-text log of the run
    .lock             held while a trainer works on the directory
    tb/, metrics.csv, wandb.json, wandb/   optional mirrors of metrics.jsonl (train.tracker)
    export/           optional: `ecdit export` (model.safetensors, config.json, vocab.json)

Study directory (written by `ecdit sweep`):

    study.yaml        the spec as given
    manifest.csv      one row per point: run_id, every axis, params/FLOPs accounting
    runs/<run_id>/    one run directory per point (config.yaml written by the sweep)
    launch.sh         optional: one DeepSpeed launcher command per point
    slurm/            optional: jobs.json (job id per point) and logs/ of `ecdit train --sweep --slurm`
    runs.csv, curves.csv, plots/, report.md, report.html   (written by collect / plot)

metrics.jsonl train records: step, images_seen, flops (cumulative training FLOPs, 3x forward),
train_loss (diffusion MSE), loss (total optimised: MSE + weighted aux terms), aux_loss, z_loss,
lr, grad_norm, images_per_s, wall_time_s, and routing statistics averaged over MoE layers:
ec_experts_per_token_mean/std/max, ec_unrouted_frac (expert choice); tc_dropped_frac,
tc_load_imbalance (token choice: max expert load / mean load, before capacity).
val records: step, images_seen, flops, val_loss, val_loss_t0..val_loss_t{K-1}, val_t (the K
fixed timesteps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ecdit_cli.errors import EcditError
from ecdit_cli.files import read_json, read_jsonl
from ecdit_cli.lock import RunLock

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FINAL_WEIGHTS = "final/model.pt"
LOG = "train.log"
LOCK = ".lock"
EVAL = "eval.json"

STUDY_SPEC = "study.yaml"
MANIFEST = "manifest.csv"
RUNS = "runs"
LAUNCH_SCRIPT = "launch.sh"

# Status values in summary.json. A run dir with a config but no summary is "pending".
STATUSES = ("pending", "running", "done", "failed", "interrupted")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def run_dirs(study: str | Path) -> list[Path]:
    """Run directories of a study, in manifest order when it exists, else sorted by name."""
    study = Path(study)
    root = study / RUNS
    if not root.is_dir():
        return []
    found = {p.name: p for p in root.iterdir() if is_run_dir(p)}
    if is_study_dir(study):
        rows, _ = read_manifest(study)
        ordered = [found.pop(r["run_id"]) for r in rows if r["run_id"] in found]
        return ordered + [found[k] for k in sorted(found)]
    return [found[k] for k in sorted(found)]


def read_manifest(study: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """The study's manifest.csv: its rows (one per point, with a run_id) and its header."""
    import csv

    path = Path(study) / MANIFEST
    if not path.is_file():
        raise EcditError(f"{study} is not a study directory (no {MANIFEST}); create one with `ecdit sweep SPEC -o DIR`")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r.get("run_id")]
            header = list(reader.fieldnames or [])
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise EcditError(f"cannot read {path}: {err}") from None
    if "run_id" not in header:
        raise EcditError(f"{path} has no run_id column (columns: {', '.join(header) or 'none'})")
    return rows, header


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """summary.json, or None when the run has not written one yet (pending or first start)."""
    p = Path(run_dir) / SUMMARY
    if not p.exists():
        return None
    return read_json(p, what="run summary")


def run_status(run_dir: str | Path) -> str:
    summary = read_summary(run_dir)
    if summary is None:
        return "pending"
    status = summary.get("status", "pending")
    if status == "running" and not lock_is_held(run_dir):
        # A trainer that was killed (-9, power loss) cannot update its summary: it is resumable.
        return "interrupted"
    return status


def lock_is_held(run_dir: str | Path) -> bool:
    return RunLock(Path(run_dir) / LOCK).is_held()


def read_records(run_dir: str | Path, warnings: list[str] | None = None) -> dict[str, list[dict]]:
    """A run's metrics.jsonl by kind: "train", "val" and "eval" (`train.eval_every`), each in file
    order; corrupt or truncated lines are skipped (warned). A record without a kind is "train"."""
    out: dict[str, list[dict]] = {"train": [], "val": [], "eval": []}
    for rec in read_jsonl(Path(run_dir) / METRICS, warnings=warnings):
        out.setdefault(rec.get("kind") or "train", []).append(rec)
    return out


def read_metrics(run_dir: str | Path, warnings: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train records, val records) of a run."""
    records = read_records(run_dir, warnings)
    return records["train"], records["val"]


def require_dir(path: str | Path, what: str = "directory") -> Path:
    p = Path(path)
    if not p.exists():
        raise EcditError(f"{what} not found: {p}")
    if not p.is_dir():
        raise EcditError(f"{what} is not a directory: {p}")
    return p


def _latest_record(metrics: Path, tail_bytes: int = 8192) -> dict[str, Any]:
    """The last complete JSON line of a metrics log, read from its end ({} when there is none)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by the tail window
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            return rec
    return {}


def status_rows(path: str | Path) -> list[dict[str, Any]]:
    """Where each point of a study (or one run directory) stands: what `ecdit status` shows."""
    path = Path(path)
    require_dir(path, "study directory")
    if is_run_dir(path):
        dirs = [path]
    elif is_study_dir(path):
        dirs = [path / RUNS / r["run_id"] for r in read_manifest(path)[0]]
    else:
        raise EcditError(f"{path} is neither a study directory (no {MANIFEST}) nor a run directory")
    rows = []
    for d in dirs:
        status = run_status(d) if is_run_dir(d) else "missing"
        summary = None
        if status not in ("pending", "missing"):
            try:
                summary = read_summary(d)
            except EcditError:
                summary = None
        summary = summary or {}
        if status == "running":  # the summary is rewritten at checkpoints; the log is current
            latest = _latest_record(d / METRICS)
            if latest.get("step", -1) > summary.get("step", 0):
                summary = {**summary, "step": latest["step"], "wall_time_s": latest.get("wall_time_s")}
        rows.append({
            "run_id": d.name, "status": status, "step": summary.get("step", 0), "steps": summary.get("steps"),
            "final_val_loss": summary.get("final_val_loss"), "wall_time_s": summary.get("wall_time_s"),
            "error": summary.get("error") if status in ("failed", "interrupted") else None,
        })
    return rows
