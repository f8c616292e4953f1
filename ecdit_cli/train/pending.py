"""The logged quantities of the steps since the last log step, kept on the device.

A step's losses, router statistics and gradient norm are device tensors; reading each back as
it is made would make the host wait for the device every micro-batch and every MoE layer. The
loop instead keeps them here (one float64 vector per step, built by device ops) and reads all
of them in one transfer when it needs them: at log, validation, evaluation and checkpoint
steps and at the end. The host then does exactly the arithmetic it did when it read each value
at once (the same floats, added in the same order), so a run logs the same numbers bit for bit.

Deferred finiteness checks (step.checks_each_step) end here too: the first step whose loss or
gradient norm is not finite is found when its values are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ecdit_cli.train.records import routing_stats
from ecdit_cli.train.step import StepOutcome


@dataclass
class _Step:
    number: int  # 1-based: the step's count once done
    lr: float
    outcome: StepOutcome
    vector: torch.Tensor | None  # float64 on the device: `parts`, then a DeepSpeed norm tensor if any


class PendingSteps:
    """Steps done but not yet read: `add` after each step, `read` when the values are needed."""

    def __init__(self, accum: int, ep_size: int) -> None:
        self.accum, self.ep_size = accum, ep_size
        self.steps: list[_Step] = []

    def add(self, number: int, lr: float, outcome: StepOutcome) -> None:
        parts = [p.detach().reshape(-1).double() for p in outcome.parts]
        if isinstance(outcome.grad_norm, torch.Tensor):
            parts.append(outcome.grad_norm.detach().reshape(-1).double())
        # One device op per quantity, queued: nothing here waits for the device.
        vector = torch.cat(parts) if parts else None
        outcome.parts = []  # the vector holds them; let the step's tensors (and their graphs) go
        self.steps.append(_Step(number, lr, outcome, vector))

    def read(self, reduce_max: Callable[[list[float]], list[float]]) -> tuple[list[dict[str, float]], tuple[int, str] | None]:
        """(per-step values in step order, the first bad step as (number, reason) or None).

        One host transfer for all pending steps; `reduce_max` takes the maximum of a list over
        processes (a collective: every rank calls `read` at the same steps), so that every rank
        finds the same bad step. Steps checked each step (eager) never count as bad here: the
        loop has already dealt with them."""
        steps, self.steps = self.steps, []
        if not steps:
            return [], None
        vectors = [s.vector for s in steps if s.vector is not None]
        flat = torch.cat(vectors).tolist() if vectors else []
        pos, raw = 0, []
        for s in steps:
            n = 0 if s.vector is None else s.vector.numel()
            raw.append(flat[pos:pos + n])
            pos += n
        from ecdit_cli.train.engine import norms_from_sums

        with_sums = [i for i, s in enumerate(steps) if s.outcome.grad_sums]
        norms: dict[int, float] = {}
        if with_sums:
            n_shared = steps[with_sums[0]].outcome.shared_sums
            sums = [raw[i][len(raw[i]) - steps[i].outcome.grad_sums:] for i in with_sums]
            norms = dict(zip(with_sums, norms_from_sums(sums, n_shared, self.ep_size), strict=True))
        out, reasons = [], []
        for i, s in enumerate(steps):
            values, first_bad_loss = self._values(s, raw[i])
            gnorm = s.outcome.grad_norm
            if i in norms:
                gnorm = norms[i]
            elif isinstance(gnorm, torch.Tensor):
                gnorm = raw[i][-1]
            values["lr"] = s.lr
            if gnorm is not None:
                values["grad_norm"] = gnorm
            out.append(values)
            reason = ""
            if s.outcome.deferred:
                if first_bad_loss is not None:
                    reason = f"non-finite loss ({first_bad_loss}) at step {s.number}"
                elif gnorm is not None and not math.isfinite(gnorm):
                    reason = f"non-finite gradient norm at step {s.number}"
            reasons.append(reason)
        bad = reduce_max([1.0 if r else 0.0 for r in reasons])
        for s, r, b in zip(steps, reasons, bad, strict=True):
            if b:
                return out, (s.number, r or f"non-finite loss or gradient norm on another process at step {s.number}")
        return out, None

    def _values(self, s: _Step, raw: list[float]) -> tuple[dict[str, Any], float | None]:
        """The step's per-step means as the loop once summed them, value by value as read."""
        values: dict[str, float] = {}
        accum = self.accum
        first_bad_loss = None

        def add(key: str, value: float) -> None:
            values[key] = values.get(key, 0.0) + value / accum

        it = iter(raw)
        for mic in s.outcome.micro:
            if mic.has_aux:
                add("aux_loss", next(it))
                add("z_loss", next(it))
            add("train_loss", next(it))
            loss = next(it)
            add("loss", loss)
            if first_bad_loss is None and not math.isfinite(loss):
                first_bad_loss = loss
            layers = [{k: (next(it) if v is None else v) for k, v in layer} for layer in mic.layers]
            for k, val in routing_stats(layers).items():
                add(k, val)
        return values, first_bad_loss

