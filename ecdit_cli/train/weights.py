"""EMA weights and the consolidated final weights file of a run.

`final/model.pt` holds every expert (gathered from the expert-parallel ranks), the EMA copy,
the tokenizer vocabulary and the config, so sampling and evaluation load it without DeepSpeed
(`ecdit_cli.model.load.load_run`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from ecdit_cli import rundir
from ecdit_cli.config import RunConfig
from ecdit_cli.files import atomic_write_bytes


class EMA:
    """Exponential moving average of the parameters (float32), used for sampling."""

    def __init__(self, model: torch.nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = state or {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up (1 + s) / (10 + s): early weights are not averaged in with a 0.999 memory.
        d = min(self.decay, (1 + step) / (10 + step))
        # The same mul_ then add_ per tensor as a loop would do (bit for bit), in two fused calls.
        shadow = [self.shadow[n] for n in self.params]
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, [p.detach().float() for p in self.params.values()], alpha=1 - d)


    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The model holds the EMA weights inside the block and its own (bit for bit) after it."""
        with torch.no_grad():
            kept = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(kept[n])


def gather_experts(tensor: torch.Tensor, ep_size: int) -> torch.Tensor:
    """All-gather a rank-local expert stack (El, ...) over its expert-parallel group -> (E, ...)."""
    if ep_size == 1:
        return tensor
    from ecdit_cli import deepspeed_compat

    group = deepspeed_compat.expert_parallel_group(ep_size)
    parts = [torch.empty_like(tensor) for _ in range(ep_size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def save_final_weights(engine, ema: EMA | None, model, run_dir: Path, dist, cfg: RunConfig) -> None:
    """final/model.pt: full weights (all experts gathered), EMA, vocabulary and config.

    Loadable without DeepSpeed (`ecdit_cli.model.load.load_run`).
    """
    ep = cfg.moe.ep_size if cfg.moe.is_moe else 1
    weights, ema_weights = {}, {}
    for name, p in engine.module.named_parameters():
        expert = getattr(p, "allreduce", True) is False
        w = p.detach().float().cpu()
        weights[name] = gather_experts(w, ep) if expert else w
        if ema is not None:
            e = ema.shadow[name]
            ema_weights[name] = gather_experts(e, ep) if expert else e
    # Race routers' learned thresholds are buffers, not parameters; every rank holds the same
    # value (averaged while training). The EMA weights sample with the live threshold.
    for name, b in engine.module.named_buffers():
        if name.endswith("race_threshold"):
            weights[name] = b.detach().float().cpu().clone()
            if ema is not None:
                ema_weights[name] = weights[name]
    if dist.is_main:
        payload = {"format_version": cfg.format_version, **model.export(), "model": weights,
                   "ema": ema_weights or None}
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(run_dir / rundir.FINAL_WEIGHTS, buf.getvalue())
