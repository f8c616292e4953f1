"""Rectified flow (docs/paper.md, "Training"): the interpolation, the loss target and the sampler.

x_t = (1 - t) x_0 + t * noise, t in [0, 1]; the network predicts the velocity
v = noise - x_0 (so x_0 = x_t - t v) and is trained with MSE. Training draws t from a
logit-normal distribution (SD3: t = sigmoid(n), n ~ N(mean, scale^2)). The validation loss uses
K fixed, stratified timesteps (midpoints of K equal bins of [0, 1]) with fixed noise, so curves
are comparable across runs and steps. Sampling integrates the ODE dx/dt = v from t = 1
(noise) to t = 0 with Euler steps and classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def sample_timesteps(n: int, mean: float, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """Logit-normal t of shape (n,)."""
    return torch.sigmoid(mean + scale * torch.randn(n, generator=generator))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, velocity target) for images x0 (B, C, H, W), noise like x0, t (B,)."""
    t4 = t.view(-1, 1, 1, 1).to(x0.dtype)
    return (1 - t4) * x0 + t4 * noise, noise - x0


def validation_timesteps(k: int) -> list[float]:
    """K stratified fixed timesteps: the midpoints (i + 0.5) / K."""
    return [(i + 0.5) / k for i in range(k)]


def euler_timesteps(steps: int, shift: float = 1.0) -> Tensor:
    """t grid from 1 to 0 (steps + 1 points); shift > 1 spends more steps at high noise (SD3)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


@torch.no_grad()
def euler_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    steps: int,
    shift: float = 1.0,
    on_step: Callable[[int, float, Tensor], None] | None = None,
) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 to 0. `velocity` applies guidance itself.

    Euler is exact for straight (rectified) paths; `steps` of 25-50 is typical.
    """
    ts = euler_timesteps(steps, shift).tolist()
    x = noise
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        if on_step is not None:
            on_step(i, t, v)
        x = x + (t_next - t) * v
    return x


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond); scale 1 = no guidance."""
    return v_uncond + scale * (v_cond - v_uncond)
