"""`train(cfg, run_dir)`: one run, top to bottom, on one process or many.

setup -> run dir + lock -> data -> model -> DeepSpeed engine -> resume -> loop -> final save.

Determinism: sample i of the training stream is a pure function of (data seed, i), and the
noise, timesteps and caption dropout of step s are drawn from a generator seeded by
(seed, s, rank, micro-batch). A run therefore resumes exactly from a checkpoint's step alone;
the checkpoint also carries the partial logging window, so a resumed run writes the same
metrics as an uninterrupted one (tests check this on CPU).

Faults: a non-finite loss or gradient norm stops the run before the optimizer step (or skips
up to `train.max_bad_steps` such steps), SIGINT/SIGTERM checkpoint at the next step boundary,
and every file the run directory holds is written atomically (see rundir.py).
"""

from __future__ import annotations

import math
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecdit_cli import __version__, rundir
from ecdit_cli.config import RunConfig, load_run_config, save_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import append_jsonl, atomic_write_json, io_error, rewrite_jsonl
from ecdit_cli.model.accounting import count
from ecdit_cli.model.rectified_flow import interpolate, sample_timesteps
from ecdit_cli.seeding import hash_seed
from ecdit_cli.train.validation import activation_dtype, validate
from ecdit_cli.train.weights import EMA, save_final_weights


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


# Config keys that may change between a run's start and its resumption.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.val_every", "train.ckpt_every",
                     "train.keep_checkpoints", "train.threads", "train.device", "train.max_bad_steps"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(cfg: RunConfig, run_dir: Path) -> None:
    """A run directory's config may only change in the keys of RESUMABLE_CHANGES."""
    path = run_dir / rundir.CONFIG
    if not path.exists():
        return
    old = load_run_config(path)  # also refuses a run directory of another format version
    a, b = _flat(old.to_dict()), _flat(cfg.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES | {"name"})
    if changed:
        k = changed[0]
        raise EcditError(
            f"{run_dir} holds a run with a different config ({k}: {a.get(k)!r} there, {b.get(k)!r} now"
            + (f"; {len(changed) - 1} more" if len(changed) > 1 else "")
            + "); use another --out directory or the same config"
        )


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

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps, "images": self.images, "seconds": self.seconds}

    @classmethod
    def from_state(cls, s: dict[str, Any] | None) -> Window:
        if not s:
            return cls()
        return cls(dict(s["sums"]), int(s["steps"]), int(s["images"]), float(s["seconds"]))


def step_generator(cfg: RunConfig, step: int, rank: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash_seed(cfg.train.seed, step, rank, micro))


def routing_stats(routing: list) -> dict[str, float]:
    """Averages over MoE layers of each router's scalar statistics."""
    if not routing:
        return {}
    keys = routing[0].stats.keys()
    return {k: float(np.mean([r.stats[k] for r in routing])) for k in keys}


def train(cfg: RunConfig, run_dir: str | Path, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train one run into `run_dir` (resuming it if it holds checkpoints); returns the summary."""
    from ecdit_cli.lock import RunLock
    from ecdit_cli.train import checkpoint
    from ecdit_cli.train.engine import (
        all_reduce,
        batch_layout,
        build_engine,
        grad_norm,
        lr_at,
        resolve_precision,
        set_lr,
        setup_distributed,
    )

    cb = callbacks or Callbacks()
    run_dir = Path(run_dir)
    t_start = time.time()

    dist = setup_distributed(cfg)
    main = dist.is_main
    micro, accum = batch_layout(cfg, dist.world_size)
    precision = resolve_precision(cfg, dist.device.type)

    lock = RunLock(run_dir / rundir.LOCK)
    if main:
        check_resume_compatible(cfg, run_dir)
        lock.acquire()
    log_file = None
    summary: dict[str, Any] = {}
    try:
        acc = None
        if main:
            save_config(cfg, run_dir / rundir.CONFIG)
            try:
                log_file = open(run_dir / rundir.LOG, "a")
            except OSError as err:
                raise io_error(run_dir / rundir.LOG, err) from None

        def log(msg: str) -> None:
            if main:
                stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                log_file.write(f"[{stamp}] {msg}\n")
                log_file.flush()
                cb.on_message(msg)

        # ---- data
        from ecdit_cli.data.sources import make_source

        d = cfg.data
        source = make_source(d.source, image_size=cfg.model.input_size, channels=cfg.model.in_channels,
                             path=d.path, min_objects=d.min_objects, max_objects=d.max_objects, seed=d.seed)

        # ---- model (identical init on every rank; experts seeded per global id)
        from ecdit_cli.model.t2i import TextToImage

        ep_rank = dist.rank % cfg.moe.ep_size if cfg.moe.is_moe else 0
        torch.manual_seed(cfg.train.seed)
        model = TextToImage(cfg, source.vocabulary(), ep_rank=ep_rank)
        engine = build_engine(cfg, model, precision, dist.world_size)
        device = engine.device
        acc = count(cfg, vocab_size=len(model.tokenizer.vocab))

        val_n = (min(cfg.data.val_size, 10**9) // dist.world_size) * dist.world_size
        val_images, val_captions = source.val_set(val_n)
        val_x = torch.from_numpy(val_images)
        val_text, val_mask = model.tokenize(val_captions)

        # ---- resume
        ckpt_dir = run_dir / rundir.CHECKPOINTS
        start_step, images_seen, wall_before, bad_steps = 0, 0, 0.0, 0
        window = Window()
        ema_state = None
        restored = checkpoint.load_latest(engine, ckpt_dir, dist.rank, warn=log)
        if restored is not None:
            client, ema_state = restored
            start_step = int(client.get("step", 0))
            images_seen = int(client.get("images_seen", 0))
            wall_before = float(client.get("wall_time_s", 0.0))
            bad_steps = int(client.get("bad_steps", 0))
            window = Window.from_state(client.get("window"))
        ema = EMA(engine.module, cfg.train.ema_decay, ema_state) if cfg.train.ema_decay > 0 else None
        if main:
            # Lines past the restored step were written after the checkpoint: drop them so the
            # curve has no duplicate or phantom steps. Without a checkpoint the run starts over
            # (its step-0 validation included), so nothing earlier survives.
            dropped = rewrite_jsonl(run_dir / rundir.METRICS,
                                    lambda r: restored is not None and int(r.get("step", 0)) <= start_step)
            if restored is not None:
                log(f"resumed from step {start_step}" + (f" (dropped {dropped} later metric lines)" if dropped else ""))

        info = {
            "run_dir": str(run_dir), "run_id": cfg.name or run_dir.name, "routing": cfg.moe.routing,
            "steps": cfg.train.steps, "start_step": start_step, "world_size": dist.world_size,
            "micro_batch_size": micro, "grad_accum": accum, "images_per_step": cfg.train.batch_size,
            "tokens_per_step": cfg.train.batch_size * cfg.model.tokens_per_image,
            "params_total": acc.params_total, "params_active": acc.params_active, "params_text": acc.params_text,
            "flops_per_image": acc.flops_per_image, "flops_per_step": 3 * acc.flops_per_image * cfg.train.batch_size,
            "device": str(device), "precision": precision, "zero_stage": cfg.train.zero_stage,
            "ep_size": cfg.moe.ep_size,
        }

        def write_summary(status: str, **extra: Any) -> None:
            nonlocal summary
            if not main:
                return
            summary = {
                "status": status, "run_id": info["run_id"], "routing": cfg.moe.routing,
                "step": step_done, "steps": cfg.train.steps, "images_seen": images_seen,
                "final_train_loss": last_train.get("train_loss"), "final_val_loss": last_val.get("val_loss"),
                "final_val_loss_t": [last_val[k] for k in sorted(last_val) if k.startswith("val_loss_t")],
                "val_t": last_val.get("val_t", []),
                "wall_time_s": wall_before + (time.time() - t_start),
                "params_total": acc.params_total, "params_active": acc.params_active,
                "params_text": acc.params_text, "flops_per_image": acc.flops_per_image,
                "train_flops": acc.train_flops(images_seen), "error": None,
                "ecdit_version": __version__, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **extra,
            }
            atomic_write_json(run_dir / rundir.SUMMARY, summary)

        step_done = start_step
        last_train: dict[str, Any] = {}
        last_val: dict[str, Any] = {}
        if main:
            prev = rundir.read_summary(run_dir) if (run_dir / rundir.SUMMARY).exists() else None
            if prev and restored is not None:
                last_train = {"train_loss": prev.get("final_train_loss")}
                last_val = {"val_loss": prev.get("final_val_loss")}
            for rec in _tail_records(run_dir, start_step):
                (last_val if rec.get("kind") == "val" else last_train).update(rec)
        write_summary("running")
        log(f"start: {info}")
        cb.on_start(info)

        # ---- signals: the first one stops at the next step boundary, a second one at once.
        # A launcher forwards a terminal's Ctrl-C as a second signal within milliseconds, so
        # signals in the first second count as one.
        stop = {"signal": 0, "at": 0.0}

        def _handler(signum, frame):
            if stop["signal"] and time.time() - stop["at"] > 1.0:
                import os

                os._exit(128 + signum)  # every file is written atomically: nothing is left half-done
            if not stop["signal"]:
                stop["signal"], stop["at"] = signum, time.time()

        old_handlers = {}
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old_handlers[s] = signal.signal(s, _handler)

        def record(kind: str, values: dict[str, Any]) -> dict[str, Any]:
            rec = {"kind": kind, "step": step_done, "images_seen": images_seen,
                   "flops": acc.train_flops(images_seen), **values}
            if main:
                append_jsonl(run_dir / rundir.METRICS, rec)
                cb.on_record(rec)
            return rec

        def client_state() -> dict[str, Any]:
            return {"step": step_done, "images_seen": images_seen, "bad_steps": bad_steps,
                    "wall_time_s": wall_before + (time.time() - t_start), "window": window.state()}

        def save_ckpt() -> None:
            checkpoint.save(engine, ckpt_dir, step_done, client_state(), ema.shadow if ema else None,
                            dist.rank, cfg.train.keep_checkpoints)

        if start_step == 0 and restored is None:
            last_val = record("val", validate(engine, cfg, val_x, val_text, val_mask, micro, dist, device))

        dtype = activation_dtype(engine)
        t_window = time.time()
        try:
            for step in range(start_step, cfg.train.steps):
                if all_reduce([float(stop["signal"])], op="max")[0]:
                    save_ckpt()
                    write_summary("interrupted", error=f"interrupted by signal at step {step_done}")
                    log(f"interrupted at step {step_done}; checkpoint saved")
                    raise TrainingInterrupted(
                        f"interrupted at step {step_done}; checkpoint saved in {ckpt_dir}. "
                        "Re-run the same command to resume."
                    )
                lr = lr_at(step, cfg)
                values: dict[str, float] = {}
                bad_reason = ""
                for m in range(accum):
                    first = step * cfg.train.batch_size + (m * dist.world_size + dist.rank) * micro
                    images, captions = source.batch("train", first, micro)
                    gen = step_generator(cfg, step, dist.rank, m)
                    x0 = torch.from_numpy(images)
                    t = sample_timesteps(micro, cfg.train.t_mean, cfg.train.t_scale, gen)
                    noise = torch.randn(x0.shape, generator=gen)
                    drop = torch.rand(micro, generator=gen) < cfg.text.caption_dropout
                    text, mask = model.tokenize(captions)
                    x_t, v = interpolate(x0, noise, t)
                    out = engine(x_t.to(device, dtype), t.to(device), text.to(device), mask.to(device),
                                 drop.to(device))
                    mse = (out.velocity.float() - v.to(device)).square().mean()
                    loss = mse
                    aux = [r.aux_loss for r in out.routing if r.aux_loss is not None]
                    zl = [r.z_loss for r in out.routing if r.z_loss is not None]
                    if aux:
                        aux_mean = torch.stack(aux).mean()
                        z_mean = torch.stack(zl).mean()
                        loss = loss + cfg.moe.aux_loss_weight * aux_mean + cfg.moe.z_loss_weight * z_mean
                        values["aux_loss"] = values.get("aux_loss", 0.0) + aux_mean.item() / accum
                        values["z_loss"] = values.get("z_loss", 0.0) + z_mean.item() / accum
                    values["train_loss"] = values.get("train_loss", 0.0) + mse.item() / accum
                    values["loss"] = values.get("loss", 0.0) + loss.item() / accum
                    for k, val in routing_stats(out.routing).items():
                        values[k] = values.get(k, 0.0) + val / accum
                    # All ranks must take the same branch (collectives follow).
                    finite = all_reduce([0.0 if math.isfinite(loss.item()) else 1.0], op="max")[0] == 0.0
                    if not finite:
                        bad_reason = bad_reason or f"non-finite loss ({loss.item()}) at step {step + 1}"
                        loss = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
                    engine.backward(loss)
                gnorm = grad_norm(engine.module, cfg.moe.ep_size if cfg.moe.is_moe else 1)
                if gnorm is not None and not math.isfinite(gnorm):
                    bad_reason = bad_reason or f"non-finite gradient norm at step {step + 1}"
                if bad_reason:
                    bad_steps += 1
                    if bad_steps > cfg.train.max_bad_steps:
                        log(bad_reason)
                        write_summary("failed", error=bad_reason + f"; last good checkpoint kept in {ckpt_dir}",
                                      last_metrics=last_train)
                        raise TrainingFailed(
                            f"{bad_reason}; the run is marked failed and its last good checkpoint is kept "
                            f"(raise train.max_bad_steps to skip such steps)"
                        )
                    log(f"{bad_reason}: step skipped ({bad_steps}/{cfg.train.max_bad_steps} allowed)")
                    for p in engine.module.parameters():
                        if p.grad is not None:
                            p.grad.zero_()
                    lr = 0.0  # a skipped step leaves the weights unchanged
                set_lr(engine, lr)
                engine.step()
                if gnorm is None:
                    gnorm = _ds_grad_norm(engine)
                    if gnorm is not None and not math.isfinite(gnorm):
                        # ZeRO-1/2 hold the gradients: the step has already happened, so this run
                        # cannot continue; its last checkpoint predates the bad step.
                        reason = f"non-finite gradient norm at step {step + 1}"
                        write_summary("failed", error=reason + f"; last good checkpoint kept in {ckpt_dir}",
                                      last_metrics=last_train)
                        raise TrainingFailed(f"{reason}; the run is marked failed (last good checkpoint kept)")
                if ema is not None:
                    ema.update(step)
                step_done = step + 1
                images_seen += cfg.train.batch_size
                values["lr"] = lr
                if gnorm is not None:
                    values["grad_norm"] = gnorm
                window.add(values)
                window.images += cfg.train.batch_size
                now = time.time()
                window.seconds += now - t_window
                t_window = now
                cb.on_step(step_done, {"loss": values["train_loss"], "images_per_s":
                                       window.images / max(window.seconds, 1e-9)})

                last = step_done == cfg.train.steps
                if step_done % cfg.train.log_every == 0 or last:
                    keys = sorted(window.sums)
                    sums = all_reduce([window.sums[k] for k in keys])
                    vals = {k: s / (window.steps * dist.world_size) for k, s in zip(keys, sums)}
                    for k in ("lr", "grad_norm"):  # identical on every rank: not averaged over ranks
                        if k in window.sums:
                            vals[k] = window.sums[k] / window.steps
                    vals["images_per_s"] = window.images / max(window.seconds, 1e-9)
                    vals["wall_time_s"] = wall_before + (time.time() - t_start)
                    last_train = record("train", vals)
                    window = Window()
                if step_done % cfg.train.val_every == 0 or last:
                    last_val = record("val", validate(engine, cfg, val_x, val_text, val_mask, micro, dist,
                                                      device))
                    t_window = time.time()  # validation time is not training throughput
                if step_done % cfg.train.ckpt_every == 0 or last:
                    save_ckpt()
                    t_window = time.time()
                    write_summary("running")
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)

        save_final_weights(engine, ema, model, run_dir, dist, cfg)
        write_summary("done")
        log(f"done: step {step_done}, final val loss {last_val.get('val_loss')}")
        return summary
    except (TrainingFailed, TrainingInterrupted):
        raise
    except EcditError as err:
        if main and acc is not None:
            _write_failed(run_dir, cfg, str(err))
        raise
    except Exception as err:
        if main:
            tb = traceback.format_exc()
            if log_file is not None:
                log_file.write(tb)
                log_file.flush()
            _write_failed(run_dir, cfg, f"{type(err).__name__}: {err}")
        raise
    finally:
        if log_file is not None:
            log_file.close()
        lock.release()


def _tail_records(run_dir: Path, upto: int) -> list[dict]:
    train, val = rundir.read_metrics(run_dir, warnings=[])
    out = [r for r in train if int(r.get("step", 0)) <= upto][-1:]
    out += [r for r in val if int(r.get("step", 0)) <= upto][-1:]
    return out


def _write_failed(run_dir: Path, cfg: RunConfig, error: str) -> None:
    prev = {}
    try:
        prev = rundir.read_summary(run_dir) or {}
    except EcditError:
        pass
    prev.update({"status": "failed", "run_id": cfg.name or run_dir.name, "error": error,
                 "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    try:
        atomic_write_json(run_dir / rundir.SUMMARY, prev)
    except EcditError:
        pass


def _ds_grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:
        return None
    if g is None:
        return None
    return float(g)
