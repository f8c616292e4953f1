"""One optimizer step: the micro-batches' forward and backward passes, then the update.

Everything random in a step (noise, timesteps, caption dropout) comes from a generator seeded
by (seed, step, position of the micro-batch in the global batch), and sample i of the training
stream is a pure function of (data seed, i): a step's inputs do not depend on what ran before
it, so a resumed run repeats an uninterrupted one, and they do not depend on how the batch is
laid out over processes either (at one `train.micro_batch_size`), so a run resumed on another
number of processes (another expert-parallel size) trains on the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ecdit_cli import deepspeed_compat, devices
from ecdit_cli.config import RunConfig
from ecdit_cli.model.inputs import text_inputs
from ecdit_cli.model.rectified_flow import interpolate, sample_timesteps
from ecdit_cli.seeding import hash_seed


def step_generator(cfg: RunConfig, step: int, slot: int) -> torch.Generator:
    """The generator of the micro-batch at `slot` = m * world_size + rank, the position its
    images hold in the global batch. The 0 stands where the rank once was: one-process runs
    (slot = m) keep drawing exactly what they drew before the seed followed the position."""
    return torch.Generator().manual_seed(hash_seed(cfg.train.seed, step, 0, slot))


@dataclass
class StepContext:
    """What every step needs: the engine and its model, the data, and the batch layout."""

    cfg: RunConfig
    engine: Any  # DeepSpeed engine (or a wrapper with the same forward/backward/step)
    model: Any  # the TextToImage inside the engine (its tokenizer)
    source: Any  # a data source (data/sources.py)
    dist: Any  # engine.Dist: rank, world size, device
    micro: int  # images per forward on this rank
    accum: int  # micro-batches per optimizer step
    dtype: torch.dtype  # activation dtype of the engine
    eager: bool = True  # read loss and gradient norm back every step (`checks_each_step`)


def checks_each_step(cfg: RunConfig, device: torch.device, clip_by_hand: bool) -> bool:
    """Whether the finiteness checks read the loss and the gradient norm back to the host in every step.

    Where a host read is free (the CPU) they do, and a bad step stops the run (or is skipped)
    before its optimizer step, as always. On an accelerator each read would be a device sync, so
    with `train.max_bad_steps=0` the step only keeps a device-side flag: a bad step's gradients
    are zeroed on the device (its update is finite) and the run fails at the next log step,
    naming the bad step, before it writes any metrics, checkpoint or weights past it. Skipping
    bad steps (`max_bad_steps > 0`) and clipping by hand (expert parallelism in fp32 without
    ZeRO: the clip needs the norm as a number) need the value every step.
    """
    return devices.syncs_are_free(device) or cfg.train.max_bad_steps > 0 or clip_by_hand


@dataclass
class MicroLayout:
    """Where one micro-batch's logged quantities sit in its step's device vector."""

    has_aux: bool  # aux_loss and z_loss come first
    layers: list[list[tuple[str, float | None]]]  # per MoE layer: (stat key, host float or None = on the device)


@dataclass
class StepOutcome:
    """What one step leaves for the log: quantities on the device, read at the next log step."""

    parts: list[torch.Tensor]  # logged scalars (0-dim) and gradient square sums (1-dim), in layout order
    micro: list[MicroLayout]
    grad_sums: int = 0  # number of per-tensor gradient square sums at the end of `parts` (0: none)
    shared_sums: int = 0  # how many of them belong to shared (not expert) parameters
    grad_norm: float | torch.Tensor | None = None  # the norm itself, where known (eager checks, ZeRO)
    bad_reason: str = ""  # eager checks: why the step must not update the weights ('' = it may)
    deferred: bool = False  # the finiteness checks are left to the log step (pending.py)


def micro_batch_inputs(ctx: StepContext, step: int, m: int) -> tuple[torch.Tensor, ...]:
    """(x_t, t, text, mask, drop, v) of micro-batch m of `step` on this rank, on the CPU."""
    cfg, dist, micro = ctx.cfg, ctx.dist, ctx.micro
    slot = m * dist.world_size + dist.rank
    first = step * cfg.train.batch_size + slot * micro
    images, captions = ctx.source.batch("train", first, micro)
    gen = step_generator(cfg, step, slot)
    x0 = torch.from_numpy(images)
    t = sample_timesteps(micro, cfg.train.t_mean, cfg.train.t_scale, gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(micro, generator=gen) < cfg.text.caption_dropout
    text, mask = text_inputs(ctx.source, ctx.model, "train", first, captions)
    x_t, v = interpolate(x0, noise, t)
    return x_t, t, text, mask, drop, v


def forward_backward(ctx: StepContext, step: int, inputs=micro_batch_inputs) -> StepOutcome:
    """Accumulate the gradients of all micro-batches of `step`; a non-finite loss backpropagates zeros.

    Nothing here reads a tensor back to the host unless `ctx.eager` (see `checks_each_step`):
    the logged quantities stay on the device in `StepOutcome.parts` until the next log step
    (pending.py). `inputs(ctx, step, m)` gives micro-batch m's tensors (`ecdit bench train`
    passes fixed ones)."""
    from ecdit_cli.train.engine import all_reduce, grad_square_sums, norm_from_sums

    cfg, engine, device, accum = ctx.cfg, ctx.engine, ctx.engine.device, ctx.accum
    parts: list[torch.Tensor] = []
    micro: list[MicroLayout] = []
    bad_reason = ""
    finite = None

    boundary = getattr(engine, "set_gradient_accumulation_boundary", None)
    for m in range(accum):
        if boundary is not None:
            # `engine.step()` runs once per optimizer step, after every micro-batch: tell DeepSpeed
            # which backward ends the accumulation (its gradient reduction happens there), or its
            # own micro-step counter would apply the update only on every accum-th call.
            boundary(m == accum - 1)
        x_t, t, text, mask, drop, v = inputs(ctx, step, m)
        out = engine(x_t.to(device, ctx.dtype), t.to(device), text.to(device), mask.to(device), drop.to(device))
        mse = (out.velocity.float() - v.to(device)).square().mean()
        loss = mse
        aux = [r.aux_loss for r in out.routing if r.aux_loss is not None]
        zl = [r.z_loss for r in out.routing if r.z_loss is not None]
        if aux:
            aux_mean = torch.stack(aux).mean()
            z_mean = torch.stack(zl).mean()
            loss = loss + cfg.moe.aux_loss_weight * aux_mean + cfg.moe.z_loss_weight * z_mean
            parts += [aux_mean, z_mean]
        parts += [mse, loss]
        layers = []
        for r in out.routing:
            layers.append([(k, None if isinstance(val, torch.Tensor) else val) for k, val in r.stat_values.items()])
            parts += [val for val in r.stat_values.values() if isinstance(val, torch.Tensor)]
        micro.append(MicroLayout(bool(aux), layers))
        if ctx.eager:
            # All ranks must take the same branch (collectives follow).
            finite_loss = all_reduce([0.0 if math.isfinite(loss.item()) else 1.0], op="max")[0] == 0.0
            if not finite_loss:
                bad_reason = bad_reason or f"non-finite loss ({loss.item()}) at step {step + 1}"
                loss = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
        else:
            ok = torch.isfinite(loss.detach())
            finite = ok if finite is None else finite & ok
        engine.backward(loss)
    if not getattr(engine, "enable_backward_allreduce", True):
        deepspeed_compat.fill_missing_grads(engine.module)
    sums, n_shared = grad_square_sums(engine.module)
    outcome = StepOutcome(parts, micro, deferred=not ctx.eager)
    if sums is not None and not ctx.eager:
        outcome.grad_sums, outcome.shared_sums = sums.numel(), n_shared
        parts.append(sums)
    ep = cfg.moe.ep_size if cfg.moe.is_moe else 1
    if ctx.eager and sums is not None:
        outcome.grad_norm = norm_from_sums(sums.tolist(), n_shared, ep)
        if not math.isfinite(outcome.grad_norm):
            bad_reason = bad_reason or f"non-finite gradient norm at step {step + 1}"
    elif sums is not None:
        # A bad step's update must stay finite without the host knowing it is bad: zero its
        # gradients on the device (the optimizer then moves the weights only by its momentum and
        # weight decay; the run fails at the next log step before anything past it is saved).
        finite = torch.isfinite(sums).all() if finite is None else finite & torch.isfinite(sums).all()
        bad = ~finite
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.masked_fill_(bad, 0.0)
    outcome.bad_reason = bad_reason
    return outcome


def zero_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.grad is not None:
            p.grad.zero_()


def optimizer_step(engine, lr: float) -> None:
    from ecdit_cli.train.engine import set_lr

    set_lr(engine, lr)
    engine.step()


def deepspeed_grad_norm(engine, eager: bool = True) -> float | torch.Tensor | None:
    """The global gradient norm DeepSpeed computed in its last step (ZeRO-1/2), if any; a
    tensor stays a tensor unless `eager` (reading it is a device sync)."""
    try:
        g = engine.get_global_grad_norm()
    except Exception:
        return None
    if g is None:
        return None
    return float(g) if eager or not isinstance(g, torch.Tensor) else g.detach()
