"""`train(cfg, run_dir)`: one run, top to bottom, on one process or many.

setup (run dir, lock, log) -> build (data, model, DeepSpeed engine, validation set) -> resume
(checkpoint, EMA, metrics) -> start (summary, step-0 validation) -> loop -> finish (final weights).

Determinism: sample i of the training stream is a pure function of (data seed, i), and the
noise, timesteps and caption dropout of step s are drawn from a generator seeded by
(seed, s, the micro-batch's place in the global batch) (step.py). A run therefore resumes
exactly from a checkpoint's step alone; the checkpoint also carries the partial logging window
(averaged over ranks), so a resumed run writes the same metrics as an uninterrupted one (tests
check this on CPU), also on another expert-parallel size (portable.py).

Host reads: a step's logged values stay on the device and are read back in one transfer at
log, validation, evaluation and checkpoint steps (pending.py), with the same floats as reading
each at once.

Faults: a non-finite loss or gradient norm stops the run before the optimizer step (or skips
up to `train.max_bad_steps` such steps; on a GPU with max_bad_steps=0 the check waits for the
next read and the bad step's gradients are zeroed, step.checks_each_step), SIGINT/SIGTERM checkpoint at the next step boundary
(signals.py), and every file the run directory holds is written atomically (see rundir.py).
"""

from __future__ import annotations

import math
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ecdit_cli import __version__, rundir
from ecdit_cli.config import RunConfig, save_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import append_jsonl, atomic_write_json, io_error, read_jsonl, rewrite_jsonl
from ecdit_cli.lock import RunLock
from ecdit_cli.model.accounting import count
from ecdit_cli.train import checkpoint
from ecdit_cli.train.pending import PendingSteps
from ecdit_cli.train.records import (
    Callbacks,
    TrainingFailed,
    TrainingInterrupted,
    Window,
    check_init_source,
    check_resume_compatible,
    now_iso,
    start_info,
    tail_records,
    write_failed,
)
from ecdit_cli.train.signals import StopRequest
from ecdit_cli.train.step import (
    StepContext,
    StepOutcome,
    checks_each_step,
    deepspeed_grad_norm,
    forward_backward,
    optimizer_step,
    zero_grads,
)
from ecdit_cli.train.trackers import close_all, open_trackers
from ecdit_cli.train.trackers import require as require_trackers
from ecdit_cli.train.validation import activation_dtype, validate
from ecdit_cli.train.weights import EMA, save_final_weights

__all__ = ["Callbacks", "TrainingFailed", "TrainingInterrupted", "check_resume_compatible", "train"]


def train(cfg: RunConfig, run_dir: str | Path, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train one run into `run_dir` (resuming it if it holds checkpoints); returns the summary."""
    run = _Run(cfg, Path(run_dir), callbacks or Callbacks())
    if run.main:
        check_resume_compatible(cfg, run.run_dir)
        check_init_source(cfg, run.run_dir)
        require_trackers(cfg.train.tracker)
        run.lock.acquire()
    try:
        run.open_log()
        run.build()
        run.resume()
        run.start()
        run.loop()
        run.finish()
        return run.summary
    except (TrainingFailed, TrainingInterrupted):
        raise
    except EcditError as err:
        if run.main and run.acc is not None:
            write_failed(run.run_dir, cfg, str(err))
        raise
    except Exception as err:
        if run.main:
            if run.log_file is not None:
                run.log_file.write(traceback.format_exc())
                run.log_file.flush()
            write_failed(run.run_dir, cfg, f"{type(err).__name__}: {err}")
        raise
    finally:
        run.close()


class _Run:
    """The state of one training process: what it built, where it stands, what it has logged."""

    def __init__(self, cfg: RunConfig, run_dir: Path, cb: Callbacks) -> None:
        from ecdit_cli.train.engine import batch_layout, clips_by_hand, resolve_precision, setup_distributed

        self.cfg, self.run_dir, self.cb = cfg, run_dir, cb
        self.t_start = time.time()
        self.dist = setup_distributed(cfg)
        self.main = self.dist.is_main
        self.micro, self.accum = batch_layout(cfg, self.dist.world_size)
        self.precision = resolve_precision(cfg, self.dist.device.type)
        self.clip_by_hand = clips_by_hand(cfg, self.precision)
        self.lock = RunLock(run_dir / rundir.LOCK)
        self.ckpt_dir = run_dir / rundir.CHECKPOINTS
        self.log_file = None
        self.acc = None  # accounting, once the model is built (a failure before it leaves no summary)
        self.summary: dict[str, Any] = {}
        self.step_done = self.images_seen = self.bad_steps = 0
        self.wall_before = 0.0
        self.window = Window()
        self.pending = PendingSteps(self.accum, cfg.moe.ep_size if cfg.moe.is_moe else 1)
        self.last_loss: float | None = None  # train loss of the latest step read back (progress display)
        self.last_train: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}
        self.restored = None
        self.trackers: list = []  # mirrors of metrics.jsonl (train.tracker), rank 0 only

    # ---- setup

    def open_log(self) -> None:
        if not self.main:
            return
        save_config(self.cfg, self.run_dir / rundir.CONFIG)
        try:
            self.log_file = open(self.run_dir / rundir.LOG, "a")
        except OSError as err:
            raise io_error(self.run_dir / rundir.LOG, err) from None

    def log(self, msg: str) -> None:
        if self.main:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            self.log_file.write(f"[{stamp}] {msg}\n")
            self.log_file.flush()
            self.cb.on_message(msg)

    def build(self) -> None:
        """Data, model (identical init on every rank; experts seeded per global id), engine."""
        from ecdit_cli.model.inputs import text_inputs, training_source
        from ecdit_cli.model.t2i import TextToImage
        from ecdit_cli.train.engine import build_engine

        cfg, d, dist = self.cfg, self.cfg.data, self.dist
        self.source = training_source(cfg, str(dist.device))  # pixels, latents (cached or encoded on the fly)
        if d.source == "scenes" and cfg.model.space == "pixel":
            from ecdit_cli.data import prefetch

            if prefetch.wanted(d.prefetch):
                self.source = prefetch.PrefetchingSource(self.source)
        ep_rank = dist.rank % cfg.moe.ep_size if cfg.moe.is_moe else 0
        torch.manual_seed(cfg.train.seed)
        self.model = TextToImage(cfg, self.source.vocabulary(), ep_rank=ep_rank)
        self.init_from()
        self.engine = build_engine(cfg, self.model, self.precision, dist.world_size)
        self.model.frozen_to(self.engine.device)  # a frozen encoder / VAE runs where the DiT does
        if cfg.train.compile:
            self.engine.compile()  # DeepSpeed's wrapper of torch.compile, on the engine's module
        self.acc = count(cfg, vocab_size=len(self.model.tokenizer.vocab))
        val_n = (min(cfg.data.val_size, 10**9) // dist.world_size) * dist.world_size
        val_images, val_captions = self.source.val_set(val_n)
        self.val_x = torch.from_numpy(val_images)
        self.val_text, self.val_mask = text_inputs(self.source, self.model, "val", 0, val_captions)

    def init_from(self) -> None:
        """`train.init_from`: a fresh run starts from another run's final weights (upcycle.py),
        before the engine copies them into its optimizer state; a resumed run keeps what its
        checkpoint holds and only carries the record forward."""
        from ecdit_cli.model.upcycle import initialise

        t = self.cfg.train
        self.init_info: dict[str, Any] = {}
        self.fresh = not checkpoint.complete_tags(self.ckpt_dir)
        if not t.init_from:
            return
        if self.fresh:
            self.init_info = initialise(self.model, t.init_from, self.cfg, self.source.vocabulary())
            if self.init_info["init_kind"] == "upcycle" and t.init_noise == 0:
                self.log("warning: upcycled experts start as exact copies (train.init_noise=0); under expert "
                         "choice their router gets no gradient and they stay copies (set train.init_noise, "
                         "e.g. 0.01)")
        elif self.main and (self.run_dir / rundir.SUMMARY).exists():
            prev = rundir.read_summary(self.run_dir) or {}
            self.init_info = {k: prev.get(k) for k in ("init_from", "init_kind", "init_flops")}

    def resume(self) -> None:
        """Restore the latest sealed checkpoint (if any) and cut the metrics back to its step."""
        self.restored = checkpoint.load_latest(self.engine, self.ckpt_dir, self.dist.rank, warn=self.log,
                                               ep_size=self.cfg.moe.ep_size if self.cfg.moe.is_moe else 1)
        ema_state = None
        if self.restored is None and not self.fresh and self.cfg.train.init_from:
            raise EcditError(f"no checkpoint in {self.ckpt_dir} can be loaded, and train.init_from applies only to a "
                             "fresh run; train into a new --out directory")
        if self.restored is not None:
            client, ema_state = self.restored
            self.step_done = int(client.get("step", 0))
            self.images_seen = int(client.get("images_seen", 0))
            self.wall_before = float(client.get("wall_time_s", 0.0))
            self.bad_steps = int(client.get("bad_steps", 0))
            self.window = Window.from_state(client.get("window"))
        decay = self.cfg.train.ema_decay
        self.ema = EMA(self.engine.module, decay, ema_state) if decay > 0 else None
        if not self.main:
            return
        # Lines past the restored step were written after the checkpoint: drop them so the curve
        # has no duplicate or phantom steps. Without a checkpoint the run starts over (its step-0
        # validation included), so nothing earlier survives.
        restored, start = self.restored is not None, self.step_done
        dropped = rewrite_jsonl(self.run_dir / rundir.METRICS, lambda r: restored and int(r.get("step", 0)) <= start)
        if restored:
            self.log(f"resumed from step {start}" + (f" (dropped {dropped} later metric lines)" if dropped else ""))
        kept = list(read_jsonl(self.run_dir / rundir.METRICS, warnings=[]))
        self.trackers = open_trackers(self.cfg, self.run_dir, self.cfg.name or self.run_dir.name,
                                      start if restored else None, kept)
        prev = rundir.read_summary(self.run_dir) if (self.run_dir / rundir.SUMMARY).exists() else None
        if prev and restored:
            self.last_train = {"train_loss": prev.get("final_train_loss")}
            self.last_val = {"val_loss": prev.get("final_val_loss")}
        for rec in tail_records(self.run_dir, start):
            (self.last_val if rec.get("kind") == "val" else self.last_train).update(rec)

    def start(self) -> None:
        self.info = start_info(self.cfg, self.acc, run_dir=self.run_dir, run_id=self.cfg.name or self.run_dir.name,
                               start_step=self.step_done, world_size=self.dist.world_size, micro=self.micro,
                               accum=self.accum, device=str(self.engine.device), precision=self.precision)
        self.write_summary("running")
        self.log(f"start: {self.info}")
        self.cb.on_start(self.info)

    # ---- records

    def wall_time(self) -> float:
        return self.wall_before + (time.time() - self.t_start)

    def write_summary(self, status: str, **extra: Any) -> None:
        if not self.main:
            return
        acc, last_val = self.acc, self.last_val
        self.summary = {
            "status": status, "run_id": self.info["run_id"], "routing": self.cfg.moe.routing,
            "step": self.step_done, "steps": self.cfg.train.steps, "images_seen": self.images_seen,
            "final_train_loss": self.last_train.get("train_loss"), "final_val_loss": last_val.get("val_loss"),
            "final_val_loss_t": [last_val[k] for k in sorted(last_val) if k.startswith("val_loss_t")],
            "val_t": last_val.get("val_t", []),
            "wall_time_s": self.wall_time(),
            "params_total": acc.params_total, "params_active": acc.params_active,
            "params_text": acc.params_text, "flops_per_image": acc.flops_per_image,
            "train_flops": acc.train_flops(self.images_seen), "error": None,
            **self.init_summary(),
            "ecdit_version": __version__, "updated_at": now_iso(),
            **extra,
        }
        atomic_write_json(self.run_dir / rundir.SUMMARY, self.summary)

    def init_summary(self) -> dict[str, Any]:
        """Where the weights came from, and the compute spent on them before this run: a study
        compares upcycled and from-scratch MoE at equal `total_train_flops`."""
        init_flops = self.init_info.get("init_flops") or 0.0
        return {"init_from": self.init_info.get("init_from"), "init_kind": self.init_info.get("init_kind"),
                "init_flops": init_flops, "total_train_flops": init_flops + self.acc.train_flops(self.images_seen)}

    def record(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        rec = {"kind": kind, "step": self.step_done, "images_seen": self.images_seen,
               "flops": self.acc.train_flops(self.images_seen), **values}
        if self.main:
            append_jsonl(self.run_dir / rundir.METRICS, rec)  # first: the source of truth
            for tracker in self.trackers:
                tracker.log(rec)
            self.cb.on_record(rec)
        return rec

    def validate(self) -> None:
        self.last_val = self.record("val", validate(self.engine, self.cfg, self.val_x, self.val_text,
                                                    self.val_mask, self.micro, self.dist, self.engine.device))

    def evaluate(self) -> None:
        """A fixed GenEval subset (prompt set and sampling seed fixed: runs compare) on the EMA
        weights, logged as a record of kind `eval`. Rank 0 samples (train.eval_every needs ep_size 1)."""
        if not self.main:
            return
        import contextlib

        from ecdit_cli.evaluate.eval_run import eval_model, fd_scores

        t, module = self.cfg.train, self.engine.module
        was_training = module.training
        weights = self.ema.swapped_in(module) if self.ema is not None else contextlib.nullcontext()
        t0 = time.time()
        with weights:
            module.eval()
            try:
                prompts, images, scores = eval_model(module, self.cfg, n=t.eval_images, cfg_scale=t.eval_cfg,
                                                     per_tag=t.eval_per_tag, seed=t.eval_seed,
                                                     guidance_max_t=t.eval_guidance_max_t)
            finally:
                module.train(was_training)
        fd = {}
        if t.eval_fd:
            fd = {k: v for k, v in fd_scores(images, prompts).items() if k in ("fd_scenes", "fd_scenes_floor")}
        self.record("eval", {"geneval_overall": scores["overall"],
                             **{f"geneval_{tag}": v for tag, v in scores["tags"].items()}, **fd,
                             "eval_images": scores["num_images"], "eval_cfg": t.eval_cfg, "eval_seed": t.eval_seed,
                             "eval_guidance_max_t": t.eval_guidance_max_t,
                             "eval_seconds": time.time() - t0})

    def save_checkpoint(self) -> None:
        from ecdit_cli.train.engine import all_reduce

        self.read_pending()  # the window it stores, and no checkpoint past a bad step
        moe = self.cfg.moe
        client = {"step": self.step_done, "images_seen": self.images_seen, "bad_steps": self.bad_steps,
                  "wall_time_s": self.wall_time(),
                  "window": self.window.state_over_ranks(all_reduce, self.dist.world_size)}
        checkpoint.save(self.engine, self.ckpt_dir, self.step_done, client, self.ema.shadow if self.ema else None,
                        self.dist.rank, self.cfg.train.keep_checkpoints, ep_size=moe.ep_size if moe.is_moe else 1,
                        num_experts=moe.num_experts if moe.is_moe else 0)

    def fail(self, reason: str, message: str) -> None:
        self.write_summary("failed", error=reason + f"; last good checkpoint kept in {self.ckpt_dir}",
                           last_metrics=self.last_train)
        raise TrainingFailed(message)

    # ---- the loop

    def loop(self) -> None:
        from ecdit_cli.train.engine import all_reduce

        ctx = StepContext(self.cfg, self.engine, self.model, self.source, self.dist, self.micro, self.accum,
                          activation_dtype(self.engine),
                          eager=checks_each_step(self.cfg, self.engine.device, self.clip_by_hand))
        with StopRequest() as stop:
            if self.step_done == 0 and self.restored is None:
                self.validate()
            self.t_window = time.time()
            for step in range(self.step_done, self.cfg.train.steps):
                if all_reduce([float(stop.signal)], op="max")[0]:
                    self.interrupt()
                outcome = forward_backward(ctx, step)
                lr = self.update(step, outcome)
                self.after_step(outcome, lr)

    def interrupt(self) -> None:
        self.save_checkpoint()
        self.write_summary("interrupted", error=f"interrupted by signal at step {self.step_done}")
        self.log(f"interrupted at step {self.step_done}; checkpoint saved")
        raise TrainingInterrupted(
            f"interrupted at step {self.step_done}; checkpoint saved in {self.ckpt_dir}. "
            "Re-run the same command to resume."
        )

    def update(self, step: int, outcome: StepOutcome) -> float:
        """The optimizer step, or a skipped one (lr 0, zero gradients) after a bad step; returns its lr."""
        from ecdit_cli.train.engine import clip_gradients, lr_at

        lr = lr_at(step, self.cfg)
        if outcome.bad_reason:
            self.bad_steps += 1
            allowed = self.cfg.train.max_bad_steps
            if self.bad_steps > allowed:
                self.log(outcome.bad_reason)
                self.fail(outcome.bad_reason, f"{outcome.bad_reason}; the run is marked failed and its last good "
                          "checkpoint is kept (raise train.max_bad_steps to skip such steps)")
            self.log(f"{outcome.bad_reason}: step skipped ({self.bad_steps}/{allowed} allowed)")
            zero_grads(self.engine.module)
            lr = 0.0  # a skipped step leaves the weights unchanged
        elif self.clip_by_hand and outcome.grad_norm is not None:
            clip_gradients(self.engine.module, self.cfg.train.grad_clip, outcome.grad_norm)
        optimizer_step(self.engine, lr)
        if outcome.grad_norm is None and not outcome.grad_sums:
            outcome.grad_norm = deepspeed_grad_norm(self.engine, eager=not outcome.deferred)
            if not outcome.deferred and outcome.grad_norm is not None and not math.isfinite(outcome.grad_norm):
                # ZeRO-1/2 hold the gradients: the step has already happened, so this run cannot
                # continue; its last checkpoint predates the bad step.
                reason = f"non-finite gradient norm at step {step + 1}"
                self.fail(reason, f"{reason}; the run is marked failed (last good checkpoint kept)")
        if self.ema is not None:
            self.ema.update(step)
        return lr

    def after_step(self, outcome: StepOutcome, lr: float) -> None:
        """Count the step into the logging window; log, validate and checkpoint when they are due.

        The step's values stay on the device (pending.py) until a step that logs, validates,
        evaluates or checkpoints reads them all back at once."""
        cfg, window = self.cfg.train, self.window
        self.step_done += 1
        self.images_seen += cfg.batch_size
        self.pending.add(self.step_done, lr, outcome)
        window.images += cfg.batch_size
        last = self.step_done == cfg.steps
        due = [self.step_done % every == 0 for every in (cfg.log_every, cfg.val_every, cfg.ckpt_every)]
        if last or any(due) or (cfg.eval_every and self.step_done % cfg.eval_every == 0):
            self.read_pending()  # also waits for the device: the window's time below is its time
        now = time.time()
        window.seconds += now - self.t_window
        self.t_window = now
        self.cb.on_step(self.step_done, {"loss": self.last_loss, "images_per_s": window.images_per_s})

        if self.step_done % cfg.log_every == 0 or last:
            from ecdit_cli.train.engine import all_reduce

            vals = window.means(all_reduce, self.dist.world_size)
            vals["wall_time_s"] = self.wall_time()
            self.last_train = self.record("train", vals)
            self.window = Window()
        if self.step_done % cfg.val_every == 0 or last:
            self.validate()
            self.t_window = time.time()  # validation time is not training throughput
        if cfg.eval_every and (self.step_done % cfg.eval_every == 0 or last):
            self.evaluate()
            self.t_window = time.time()  # nor is evaluation
        if self.step_done % cfg.ckpt_every == 0 or last:
            self.save_checkpoint()
            self.t_window = time.time()
            self.write_summary("running")

    def read_pending(self) -> None:
        """Read the pending steps' values into the window (one host transfer); fail on a bad step
        that deferred checks let through (step.checks_each_step)."""
        from ecdit_cli.train.engine import all_reduce

        steps, bad = self.pending.read(lambda flags: all_reduce(flags, op="max"))
        if bad is not None:
            reason = bad[1]
            self.log(reason)
            self.fail(reason, f"{reason} (found at step {self.step_done}: on {self.engine.device.type} the check "
                      "runs when the values are read, at log, validation and checkpoint steps); the run is marked "
                      "failed and its last good checkpoint is kept (train.max_bad_steps > 0 checks every step)")
        for values in steps:
            self.window.add(values)
        if steps:
            self.last_loss = steps[-1]["train_loss"]

    def finish(self) -> None:
        save_final_weights(self.engine, self.ema, self.model, self.run_dir, self.dist, self.cfg)
        self.write_summary("done")
        self.log(f"done: step {self.step_done}, final val loss {self.last_val.get('val_loss')}")

    def close(self) -> None:
        if hasattr(getattr(self, "source", None), "close"):
            self.source.close()  # the prefetch worker
        close_all(self.trackers)
        if self.log_file is not None:
            self.log_file.close()
        self.lock.release()
