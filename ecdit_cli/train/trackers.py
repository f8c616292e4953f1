"""Metric mirrors of metrics.jsonl: TensorBoard, Weights & Biases and a CSV file (`train.tracker`).

metrics.jsonl stays the source of truth (resume, `ecdit collect` and `ecdit status` read it);
each mirror gets every record the JSONL gets, as it is written (`_Run.record` in loop.py is the
one place that writes metrics), on rank 0 only. On a restart the run cuts the JSONL back to its
checkpoint's step (loop.py `resume`), and `open_trackers` brings each mirror to the same records:

- csv (RUN_DIR/metrics.csv): rewritten from the kept records, then appended to;
- tensorboard (RUN_DIR/tb/): a new event file in the same log directory that opens with
  TensorBoard's restart marker (`purge_step`): readers drop every earlier event at a step past
  the checkpoint, so the curve has no duplicate steps. A log directory without events (the
  tracker was added at a restart, or tb/ was deleted) is filled from the kept records instead;
- wandb: the run's wandb id is kept in RUN_DIR/wandb.json and a restart resumes that wandb run
  (`resume="allow"`). wandb cannot take back what it received, so records at steps it already has
  (logged after the checkpoint, before the crash) are not sent twice; it keeps the first values,
  which a deterministic run (CPU) reproduces exactly. A run that starts over gets a new wandb run.
  Offline unless `train.wandb_mode` or $WANDB_MODE says otherwise: nothing leaves the machine
  until the user runs `wandb sync`.

The libraries are optional (`pip install -e '.[track]'`) and imported only when listed.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from ecdit_cli import rundir
from ecdit_cli.config import RunConfig
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_json, atomic_write_text, io_error, read_json, read_jsonl

TB_DIR = "tb"
CSV_FILE = "metrics.csv"
WANDB_STATE = "wandb.json"
# tracker -> (module it needs, pip extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "track"), "wandb": ("wandb", "track")}


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def require(names: list[str]) -> None:
    """One line naming the extra to install when a listed tracker's library is missing."""
    import importlib.util

    for name in names:
        if name in NEEDS:
            module, extra = NEEDS[name]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise EcditError(f"train.tracker lists {name}, which needs the {module} package: "
                                 f"pip install -e '.[{extra}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's finite numbers as `kind/key` tags (what metrics.jsonl holds as numbers: a
    non-finite value is null there)."""
    kind = record.get("kind") or "train"
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}


def open_trackers(cfg: RunConfig, run_dir: Path, run_id: str, start: int | None, kept: list[dict[str, Any]]
                  ) -> list[Tracker]:
    """The mirrors `cfg.train.tracker` lists, each holding exactly the `kept` records of metrics.jsonl.
    `start`: the step of the checkpoint the run continues from (None: it starts over, `kept` is empty)."""
    restored = start is not None
    out: list[Tracker] = []
    try:
        for name in cfg.train.tracker:
            if name == "csv":
                out.append(CSVMirror(run_dir, kept))
            elif name == "tensorboard":
                out.append(TensorBoardMirror(run_dir, start, kept))
            elif name == "wandb":
                out.append(WandbMirror(cfg, run_dir, run_id, restored, kept))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(trackers: list[Tracker]) -> None:
    for t in trackers:
        try:
            t.close()
        except Exception:  # noqa: BLE001 - a mirror that cannot close must not hide the run's own error
            pass


class CSVMirror:
    """RUN_DIR/metrics.csv: one row per record, one column per key (first seen first); lists as JSON."""

    def __init__(self, run_dir: Path, kept: list[dict[str, Any]]) -> None:
        self.path, self.metrics = run_dir / CSV_FILE, run_dir / rundir.METRICS
        self.rewrite(kept)

    @staticmethod
    def _cell(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return ""
        return json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        import io

        self.header = list(dict.fromkeys(["kind", "step", *(k for r in records for k in r)]))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.header)
        writer.writeheader()
        for r in records:
            writer.writerow({k: self._cell(v) for k, v in r.items()})
        atomic_write_text(self.path, buf.getvalue())

    def log(self, record: dict[str, Any]) -> None:
        if any(k not in self.header for k in record):
            # A new column (the first val or eval record): the header changes, so the file is
            # rewritten from metrics.jsonl, which already holds this record.
            self.rewrite(list(read_jsonl(self.metrics, warnings=[])))
            return
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.header).writerow({k: self._cell(v) for k, v in record.items()})
        except OSError as err:
            raise io_error(self.path, err) from None

    def close(self) -> None:
        pass


class TensorBoardMirror:
    """RUN_DIR/tb/: scalars `kind/key` at the record's step, through torch's SummaryWriter."""

    def __init__(self, run_dir: Path, start: int | None, kept: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / TB_DIR
        has_events = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
        # TensorBoard's restart marker: events of earlier files at steps >= purge_step are dropped.
        # Without a checkpoint the run starts over, so everything is.
        purge = (0 if start is None else start + 1) if has_events else None
        try:
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        except OSError as err:
            raise io_error(log_dir, err) from None
        if not has_events:
            for rec in kept:
                self._add(rec)
            self.writer.flush()

    def _add(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, v in scalars(record).items():
            self.writer.add_scalar(tag, v, global_step=step)

    def log(self, record: dict[str, Any]) -> None:
        self._add(record)
        # Flushed per record: a live TensorBoard sees it now, and a kill -9 cannot lose records
        # at or before a checkpoint (which the purge on restart would then not bring back).
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode(cfg: RunConfig) -> str:
    return cfg.train.wandb_mode or os.environ.get("WANDB_MODE") or "offline"


def wandb_project(cfg: RunConfig, run_dir: Path) -> str:
    """train.wandb_project, $WANDB_PROJECT, the study's directory name for a study point, or "ecdit"."""
    if cfg.train.wandb_project or os.environ.get("WANDB_PROJECT"):
        return cfg.train.wandb_project or os.environ["WANDB_PROJECT"]
    study = run_dir.resolve().parent.parent
    return study.name if run_dir.resolve().parent.name == rundir.RUNS and rundir.is_study_dir(study) else "ecdit"


class WandbMirror:
    """One wandb run per ecdit run (id in RUN_DIR/wandb.json), resumed across restarts."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str, restored: bool, kept: list[dict[str, Any]]) -> None:
        import wandb

        self.state_path = run_dir / WANDB_STATE
        state = read_json(self.state_path, "wandb state") if restored and self.state_path.is_file() else None
        # The last (step, kinds) wandb received: a resumed run does not send those records again.
        self.last_step, self.last_kinds = (state["last_step"], set(state["last_kinds"])) if state else (-1, set())
        mode = wandb_mode(cfg)
        self.state = {"id": state["id"] if state else secrets.token_hex(4), "project": wandb_project(cfg, run_dir),
                      "name": run_id, "mode": mode}
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False,
                                  disable_git=True, x_save_requirements=False)
        try:
            self.run = wandb.init(id=self.state["id"], project=self.state["project"], name=run_id, resume="allow",
                                  mode=mode, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                                  config=cfg.to_dict(), settings=settings, reinit="create_new")
        except Exception as err:  # wandb raises its own types (no API key online, ...)
            raise EcditError(f"wandb could not start a run ({mode} mode): {type(err).__name__}: {err}") from None
        self._save()
        for rec in kept:
            self.log(rec)

    def _save(self) -> None:
        atomic_write_json(self.state_path, {**self.state, "last_step": self.last_step,
                                            "last_kinds": sorted(self.last_kinds)})

    def log(self, record: dict[str, Any]) -> None:
        step, kind = int(record.get("step", 0)), record.get("kind") or "train"
        if step < self.last_step or (step == self.last_step and kind in self.last_kinds):
            return
        self.run.log(scalars(record), step=step)
        self.last_kinds = (self.last_kinds if step == self.last_step else set()) | {kind}
        self.last_step = step
        self._save()

    def close(self) -> None:
        self.run.finish()
