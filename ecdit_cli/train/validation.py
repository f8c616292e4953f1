"""The low-variance validation loss of a run: fixed images, fixed noise, K fixed timesteps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ecdit_cli.config import RunConfig
from ecdit_cli.model.rectified_flow import interpolate, validation_timesteps
from ecdit_cli.seeding import hash_seed


def validate(engine, cfg: RunConfig, val_x: torch.Tensor, val_text, val_mask, micro: int,
             dist, device) -> dict[str, Any]:
    """Low-variance validation loss: fixed images, fixed noise, K stratified fixed t.

    Each rank scores an equal shard of the held-out set; sums are all-reduced.
    """
    from ecdit_cli.train.engine import all_reduce

    ts = validation_timesteps(cfg.train.val_timesteps)
    n_total = val_x.shape[0]
    per_rank = n_total // dist.world_size
    lo = dist.rank * per_rank
    gen = torch.Generator().manual_seed(hash_seed(cfg.data.seed, 0xA11))
    noise_all = torch.randn(val_x.shape, generator=gen)
    sq = [0.0] * len(ts)
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        for start in range(lo, lo + per_rank, micro):
            end = min(start + micro, lo + per_rank)
            x0 = val_x[start:end].to(device)
            noise = noise_all[start:end].to(device)
            text, mask = val_text[start:end].to(device), val_mask[start:end].to(device)
            for i, t in enumerate(ts):
                tt = torch.full((end - start,), t, device=device)
                x_t, v = interpolate(x0, noise, tt)
                out = engine(x_t.to(activation_dtype(engine)), tt, text, mask)
                sq[i] += float((out.velocity.float() - v).square().mean(dim=(1, 2, 3)).sum())
    engine.module.train(was_training)
    sq = all_reduce(sq)
    n = per_rank * dist.world_size
    per_t = [s / n for s in sq]
    rec: dict[str, Any] = {"val_loss": float(np.mean(per_t))}
    for i, v in enumerate(per_t):
        rec[f"val_loss_t{i}"] = v
    rec["val_t"] = ts
    return rec


def activation_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if getattr(engine, "bfloat16_enabled", lambda: False)() else torch.float32
