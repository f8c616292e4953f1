"""What a run records about itself: callbacks, outcomes, the logging window, the summary file.

These are the pieces of a run's bookkeeping that do not need a model: the loop (loop.py) fills
them, the CLI displays them through `Callbacks`, and `ecdit status` reads what they write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ecdit_cli import rundir
from ecdit_cli.config import RunConfig, config_changes, load_run_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_json


class TrainingFailed(EcditError):
    """The run stopped with status 'failed' (non-finite values, a crash); the summary says why."""


class TrainingInterrupted(EcditError):
    """SIGINT/SIGTERM: the run saved a checkpoint and can be resumed."""


@dataclass
class Callbacks:
    """Hooks for progress display (rank 0 only). The library never prints itself."""

    on_start: Callable[[dict[str, Any]], None] = lambda info: None
    on_step: Callable[[int, dict[str, Any]], None] = lambda step, info: None
    on_record: Callable[[dict[str, Any]], None] = lambda record: None
    on_message: Callable[[str], None] = lambda msg: None


# Config keys that may change between a run's start and its resumption (moe.ep_size through the
# checkpoint's portable expert state, train/portable.py).
RESUMABLE_CHANGES = {"moe.ep_size", "train.steps", "train.log_every", "train.val_every", "train.ckpt_every",
                     "train.keep_checkpoints", "train.threads", "train.device", "train.max_bad_steps",
                     "train.compile", "train.eval_every", "train.eval_per_tag", "train.eval_images",
                     "train.eval_cfg", "train.eval_guidance_max_t", "train.eval_seed", "train.eval_fd", "train.tracker", "train.wandb_mode", "train.wandb_project"}


def check_resume_compatible(cfg: RunConfig, run_dir: Path) -> None:
    """A run directory's config may only change in the keys of RESUMABLE_CHANGES."""
    path = run_dir / rundir.CONFIG
    if not path.exists():
        return
    old = load_run_config(path)  # also refuses a run directory of another format version
    changed = config_changes(old, cfg, RESUMABLE_CHANGES | {"name"})
    if changed:
        k, there, now = changed[0]
        raise EcditError(
            f"{run_dir} holds a run with a different config ({k}: {there!r} there, {now!r} now"
            + (f"; {len(changed) - 1} more" if len(changed) > 1 else "")
            + "); use another --out directory or the same config"
        )


def check_init_source(cfg: RunConfig, run_dir: Path) -> None:
    """`train.init_from` of a run that has not started yet names a finished, compatible run
    (a started run has its weights in its checkpoints and no longer needs the source)."""
    from ecdit_cli.model.upcycle import check_source

    if cfg.train.init_from and not any((run_dir / rundir.CHECKPOINTS).glob("step*/ecdit_complete.json")):
        check_source(cfg)


@dataclass
class Window:
    """Sums over the current logging window (plain floats so they fit in a checkpoint)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def means(self, reduce_sum: Callable[[list[float]], list[float]], world_size: int) -> dict[str, float]:
        """Per-step means over the window and over ranks (`reduce_sum` sums a list across ranks)."""
        keys = sorted(self.sums)
        sums = reduce_sum([self.sums[k] for k in keys])
        vals = {k: s / (self.steps * world_size) for k, s in zip(keys, sums)}
        for k in ("lr", "grad_norm"):  # identical on every rank: not averaged over ranks
            if k in self.sums:
                vals[k] = self.sums[k] / self.steps
        vals["images_per_s"] = self.images_per_s
        return vals

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps, "images": self.images, "seconds": self.seconds}

    def state_over_ranks(self, reduce_sum: Callable[[list[float]], list[float]], world_size: int) -> dict[str, Any]:
        """`state()` with the sums averaged over ranks (a collective: every rank calls it).

        Every rank resumes with these sums, so `means` gives the same window mean on any number
        of processes: world x the average equals the sum over the ranks that wrote them."""
        s = self.state()
        keys = sorted(self.sums)
        if world_size > 1:
            s["sums"] = {k: v / world_size for k, v in zip(keys, reduce_sum([self.sums[k] for k in keys]))}
        return s

    @classmethod
    def from_state(cls, s: dict[str, Any] | None) -> Window:
        if not s:
            return cls()
        return cls(dict(s["sums"]), int(s["steps"]), int(s["images"]), float(s["seconds"]))


def start_info(cfg: RunConfig, acc: Any, *, run_dir: Path, run_id: str, start_step: int, world_size: int,
               micro: int, accum: int, device: str, precision: str) -> dict[str, Any]:
    """What a run states at its start (train.log, the progress header, `--dry-run`)."""
    B = cfg.train.batch_size
    return {
        "run_dir": str(run_dir), "run_id": run_id, "routing": cfg.moe.routing, "steps": cfg.train.steps,
        "start_step": start_step, "world_size": world_size, "micro_batch_size": micro, "grad_accum": accum,
        "images_per_step": B, "tokens_per_step": B * cfg.model.tokens_per_image,
        "params_total": acc.params_total, "params_active": acc.params_active, "params_text": acc.params_text,
        "flops_per_image": acc.flops_per_image, "flops_per_step": 3 * acc.flops_per_image * B,
        "device": device, "precision": precision, "zero_stage": cfg.train.zero_stage, "ep_size": cfg.moe.ep_size,
    }


def routing_stats(layers: list[dict[str, float]]) -> dict[str, float]:
    """Averages over MoE layers of each router's scalar statistics (one dict of floats per layer)."""
    if not layers:
        return {}
    keys = layers[0].keys()
    return {k: float(np.mean([stats[k] for stats in layers])) for k in keys}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tail_records(run_dir: Path, upto: int) -> list[dict]:
    """The last train and the last val record at or before step `upto`."""
    train, val = rundir.read_metrics(run_dir, warnings=[])
    out = [r for r in train if int(r.get("step", 0)) <= upto][-1:]
    out += [r for r in val if int(r.get("step", 0)) <= upto][-1:]
    return out


def write_failed(run_dir: Path, cfg: RunConfig, error: str) -> None:
    """Mark a run failed in its summary, keeping what the summary already says (best effort)."""
    prev = {}
    try:
        prev = rundir.read_summary(run_dir) or {}
    except EcditError:
        pass
    prev.update({"status": "failed", "run_id": cfg.name or run_dir.name, "error": error, "updated_at": now_iso()})
    try:
        atomic_write_json(run_dir / rundir.SUMMARY, prev)
    except EcditError:
        pass
