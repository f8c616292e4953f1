"""What MoE buys over dense, read off the fits and curves: effective parameters and speed-ups.

- `effective_params`: the dense size whose fitted loss equals an MoE run's loss (the
  "effective-parameter multiplier" of the scaling-law papers);
- `convergence_speedup`: where an MoE loss curve first reaches the dense run's final loss, in
  steps or FLOPs (the paper's "2x fewer steps").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ecdit_cli.study.fit import FitError, PowerLawFit, check_positive


@dataclass
class EffectiveParams:
    n_moe: float
    loss_moe: float
    n_equiv: float  # dense size whose fitted loss equals loss_moe; NaN (with a reason) if none
    multiplier: float  # n_equiv / n_moe
    reason: str = ""  # why there is no n_equiv
    note: str = ""  # a caveat on an n_equiv that exists (an extrapolation)


def effective_params(dense: PowerLawFit, n_moe: float, loss_moe: float,
                     dense_range: tuple[float, float] | None = None) -> EffectiveParams:
    """Invert the dense fit at the MoE loss: N_equiv = (A / (L_moe - E))^(1/alpha).

    n_moe in the dense fit's units: activated parameters read the multiplier as "dense parameters
    bought per activated parameter", total parameters as "per stored parameter". With the dense
    runs' size range given, an N_equiv outside it is flagged: near the fitted asymptote a tiny
    loss difference maps to an enormous size, so such multipliers are extrapolations, not findings.
    """
    check_positive({"n_moe": np.array([n_moe]), "loss_moe": np.array([loss_moe])})
    if not dense.alpha > 0:
        return EffectiveParams(n_moe, loss_moe, math.nan, math.nan, "the dense fit has alpha = 0: no inverse")
    if loss_moe <= dense.E:
        return EffectiveParams(n_moe, loss_moe, math.nan, math.nan,
                               f"loss {loss_moe:.4g} is at or below the dense asymptote E={dense.E:.4g}: "
                               "no dense size reaches it")
    n_eq = (dense.A / (loss_moe - dense.E)) ** (1 / dense.alpha)
    note = ""
    if dense_range is not None and not dense_range[0] <= n_eq <= dense_range[1]:
        lo, hi = dense_range
        side = f"{n_eq / hi:.3g}x the largest" if n_eq > hi else f"{lo / n_eq:.3g}x below the smallest"
        note = f"extrapolated: {side} dense run the fit saw ({lo:.3g}-{hi:.3g})"
    return EffectiveParams(n_moe, loss_moe, n_eq, n_eq / n_moe, note=note)


@dataclass
class SpeedUp:
    target_loss: float  # the dense run's final (smoothed) loss
    x_dense_final: float
    x_moe: float | None  # where the MoE curve first reaches target_loss; None if it never does
    fraction: float | None  # x_moe / x_dense_final
    speedup: float | None  # 1 / fraction
    reason: str = ""


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    # Centred moving mean truncated at the ends: no lag mid-curve (a trailing mean would delay
    # the MoE crossing), and the last point only averages the final window // 2 + 1 points.
    if window <= 1:
        return y
    c, i = np.concatenate([[0.0], np.cumsum(y)]), np.arange(len(y))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def convergence_speedup(x_dense, loss_dense, x_moe, loss_moe, *, smooth: int = 1) -> SpeedUp:
    """Where (in steps or FLOPs) the MoE curve first reaches the dense run's final loss.

    Linear interpolation between logged points; `smooth` > 1 first applies a centred moving
    mean of that many points to both curves.
    """
    curves = []
    for name, x, y in (("dense", x_dense, loss_dense), ("moe", x_moe, loss_moe)):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
            raise FitError(f"the {name} curve needs x and loss of the same length, at least 2 points")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise FitError(f"the {name} curve has non-finite x or loss values: drop them first")
        if (np.diff(x) <= 0).any():
            raise FitError(f"the {name} curve's x must be strictly increasing (sort it, drop repeated steps)")
        curves.append((x, _smooth(y, smooth)))
    (xd, ld), (xm, lm) = curves
    target, x_final = float(ld[-1]), float(xd[-1])
    hit = np.flatnonzero(lm <= target)
    if len(hit) == 0:
        return SpeedUp(target, x_final, None, None, None,
                       f"the MoE curve never reaches the dense final loss {target:.4g} "
                       f"(its lowest: {lm.min():.4g})")
    i = int(hit[0])
    x_hit = float(xm[0])
    if i > 0:  # between the last point above the target and the first at or below it
        x_hit = float(xm[i - 1] + (lm[i - 1] - target) / (lm[i - 1] - lm[i]) * (xm[i] - xm[i - 1]))
    frac = x_hit / x_final
    return SpeedUp(target, x_final, x_hit, frac, 1 / frac if frac > 0 else math.inf)
