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

from ecdit_cli import deepspeed_compat
from ecdit_cli.config import RunConfig
from ecdit_cli.model.inputs import text_inputs
from ecdit_cli.model.rectified_flow import interpolate, sample_timesteps
from ecdit_cli.seeding import hash_seed
from ecdit_cli.train.records import routing_stats


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


@dataclass
class StepOutcome:
    values: dict[str, float]  # per-step means of the logged quantities (this rank)
    grad_norm: float | None  # None when DeepSpeed holds the gradients (ZeRO-1/2)
    bad_reason: str = ""  # why the step must not update the weights ('' = it may)


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

    `inputs(ctx, step, m)` gives micro-batch m's tensors (`ecdit bench train` passes fixed ones)."""
    from ecdit_cli.train.engine import all_reduce, grad_norm

    cfg, engine, device, accum = ctx.cfg, ctx.engine, ctx.engine.device, ctx.accum
    values: dict[str, float] = {}
    bad_reason = ""

    def add(key: str, value: float) -> None:
        values[key] = values.get(key, 0.0) + value / accum

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
            add("aux_loss", aux_mean.item())
            add("z_loss", z_mean.item())
        add("train_loss", mse.item())
        add("loss", loss.item())
        for k, val in routing_stats(out.routing).items():
            add(k, val)
        # All ranks must take the same branch (collectives follow).
        finite = all_reduce([0.0 if math.isfinite(loss.item()) else 1.0], op="max")[0] == 0.0
        if not finite:
            bad_reason = bad_reason or f"non-finite loss ({loss.item()}) at step {step + 1}"
            loss = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
        engine.backward(loss)
    if not getattr(engine, "enable_backward_allreduce", True):
        deepspeed_compat.fill_missing_grads(engine.module)
    gnorm = grad_norm(engine.module, cfg.moe.ep_size if cfg.moe.is_moe else 1)
    if gnorm is not None and not math.isfinite(gnorm):
        bad_reason = bad_reason or f"non-finite gradient norm at step {step + 1}"
    return StepOutcome(values, gnorm, bad_reason)


def zero_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.grad is not None:
            p.grad.zero_()


def optimizer_step(engine, lr: float) -> None:
    from ecdit_cli.train.engine import set_lr

    set_lr(engine, lr)
    engine.step()


def deepspeed_grad_norm(engine) -> float | None:
    """The global gradient norm DeepSpeed computed in its last step (ZeRO-1/2), if any."""
    try:
        g = engine.get_global_grad_norm()
    except Exception:
        return None
    return None if g is None else float(g)
