"""Scaling-law fits as pure functions on arrays and DataFrames.

Forms:
- Saturating power law (Kaplan et al. 2020, with an irreducible term): L(X) = E + A * X^-alpha.
- Chinchilla form (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^alpha + B / D^beta,
  and the compute-optimal allocation it implies for C = k * N * D (k = 6 by default):
  N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta / (alpha+beta), b = alpha / (alpha+beta).

Both are fitted as in Hoffmann et al.: a Huber loss (delta 1e-3) on log residuals, with
log L_hat = LSE(e, a_1 - alpha_1 log X_1, ...), minimised by L-BFGS-B from a grid of starts;
confidence intervals are bootstrap percentiles. Each X is divided by its geometric mean before
fitting so the starts and bounds do not depend on the user's units; A and B are reported back
in those units. MoE views on top: the dense-equivalent parameter multiplier and the
convergence speed-up (steps for an MoE run to reach a dense run's final loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from ecdit_cli.errors import EcditError, did_you_mean

try:  # optional: speed only. L-BFGS-B's tiny LAPACK calls wake every OpenBLAS thread; on a busy
    # machine each step then waits ~5 ms for a core instead of taking ~0.1 ms.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


def _one_blas_thread() -> contextlib.AbstractContextManager:
    return threadpool_limits(1, "blas") if threadpool_limits else contextlib.nullcontext()


class FitError(EcditError):
    """Data that cannot be fitted: too few points, bad values, a missing column, no convergence."""


@dataclass
class PowerLawFit:
    """L(X) = E + A * X^-alpha, with A in the units of the X that was fitted."""

    E: float
    A: float
    alpha: float
    ci: dict[str, tuple[float, float]]  # 95% bootstrap percentile interval per parameter
    n: int  # points fitted
    rmse_log: float  # RMSE of log(L_hat) - log(L)
    r2_log: float  # R^2 of log L
    converged: bool
    n_boot: int  # bootstrap refits attempted
    n_boot_ok: int  # ... and how many converged (the CIs come from these)
    warnings: list[str] = field(default_factory=list)
    group: Any = None
    boot: np.ndarray = field(default=None, repr=False)  # (n_boot_ok, 3): E, A, alpha per refit

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, ("E", "A", "alpha"))


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with A and B in the user's units of N and D."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    ci: dict[str, tuple[float, float]]
    n: int
    rmse_log: float
    r2_log: float
    converged: bool
    n_boot: int
    n_boot_ok: int
    warnings: list[str] = field(default_factory=list)
    group: Any = None
    boot: np.ndarray = field(default=None, repr=False)  # (n_boot_ok, 5): E, A, alpha, B, beta

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, ("E", "A", "alpha", "B", "beta"))


def _to_dict(fit: PowerLawFit | ChinchillaFit, names: Sequence[str]) -> dict[str, Any]:
    # Plain floats, NaN -> None: the dict goes straight into json.dumps(allow_nan=False).
    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    out: dict[str, Any] = {"group": fit.group.item() if hasattr(fit.group, "item") else fit.group}
    for k in names:
        out[k] = num(getattr(fit, k))
        out[f"{k}_lo"], out[f"{k}_hi"] = (num(v) for v in fit.ci[k])
    out.update(n=fit.n, rmse_log=num(fit.rmse_log), r2_log=num(fit.r2_log), converged=fit.converged)
    out.update(n_boot=fit.n_boot, n_boot_ok=fit.n_boot_ok, warnings=list(fit.warnings))
    return out


# ---------------------------------------------------------------------------- core optimiser
# Parameters theta = (e, a_1, alpha_1, ..., a_m, alpha_m) on covariates z_j = log(X_j / g_j):
# r_i = LSE(e, a_j - alpha_j z_ij) - log L_i. The LSE keeps every term positive without
# constraints and is exact in floating point at any scale (Hoffmann et al., appendix D.2).


def _terms(theta: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L_hat (n,) and its softmax weights d log L_hat / d term (n, 1 + m)."""
    T = np.empty((Z.shape[0], Z.shape[1] + 1))
    T[:, 0] = theta[0]
    T[:, 1:] = theta[1::2] - theta[2::2] * Z
    # Hand-written LSE: scipy.special.logsumexp costs ~100x more on arrays this small.
    top = T.max(axis=1, keepdims=True)
    ex = np.exp(T - top)
    tot = ex.sum(axis=1, keepdims=True)
    return (top + np.log(tot))[:, 0], ex / tot


def _objective(theta: np.ndarray, Z: np.ndarray, logy: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    lhat, w = _terms(theta, Z)
    r = lhat - logy
    # Huber divided by delta: the same minimiser, but values of order |r| / delta keep L-BFGS-B's
    # relative stopping tests meaningful when delta is tiny.
    absr = np.abs(r)
    loss = np.where(absr <= delta, 0.5 * r**2 / delta, absr - 0.5 * delta).mean()
    dr = np.clip(r, -delta, delta) / delta / len(r)
    grad = np.empty_like(theta)
    grad[0] = dr @ w[:, 0]
    grad[1::2] = dr @ w[:, 1:]
    grad[2::2] = -(dr[:, None] * w[:, 1:] * Z).sum(axis=0)
    return loss, grad


def _grid(logy: np.ndarray, m: int) -> np.ndarray:
    """Scale-free starting points (S, 1 + 2m): E as a fraction of min L, exponents, A/B split."""
    lmin, lmid = math.exp(logy.min()), math.exp(np.median(logy))
    alphas = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0) if m == 1 else (0.1, 0.25, 0.5, 0.8, 1.2)
    splits = [(1.0,)] if m == 1 else [(f, 1 - f) for f in (0.2, 0.5, 0.8)]
    rows = []
    for ef, split, als in itertools.product((0.01, 0.2, 0.5, 0.8, 0.95), splits, itertools.product(alphas, repeat=m)):
        e = ef * lmin
        # Each term starts at its share of the reducible loss at the geometric-mean X (z = 0).
        rest = max(lmid - e, 1e-3 * lmid)
        rows.append([math.log(e)] + [v for f, al in zip(split, als, strict=True) for v in (math.log(f * rest), al)])
    return np.array(rows)


def _screen(starts: np.ndarray, Z: np.ndarray, logy: np.ndarray, delta: float, keep: int) -> np.ndarray:
    """The `keep` starts with the lowest loss, evaluated for the whole grid at once.

    Running L-BFGS-B from every grid point (Hoffmann et al.) costs ~100x more for the same
    optimum on these small, smooth problems; polishing the best few keeps the multi-start guard.
    """
    T = np.empty((len(starts), Z.shape[0], Z.shape[1] + 1))  # (S, n, 1 + m)
    T[:, :, 0] = starts[:, :1]
    T[:, :, 1:] = starts[:, None, 1::2] - starts[:, None, 2::2] * Z[None]
    top = T.max(axis=2)
    r = top + np.log(np.exp(T - top[..., None]).sum(axis=2)) - logy
    loss = np.where(np.abs(r) <= delta, 0.5 * r**2 / delta, np.abs(r) - 0.5 * delta).mean(axis=1)
    return starts[np.argsort(loss)[:keep]]


def _minimise(Z, logy, starts, bounds, delta) -> tuple[np.ndarray, bool, str]:
    """Best of L-BFGS-B runs from each start; converged if the best run says so."""
    lo, hi = np.array(bounds).T
    best = None
    for x0 in starts:
        res = minimize(_objective, np.clip(x0, lo, hi), args=(Z, logy, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 1000})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is not None and not best.success:
        # The Huber kinks can stop a line search right at the optimum ("ABNORMAL_TERMINATION");
        # one restart from there either confirms it or moves on.
        res = minimize(_objective, best.x, args=(Z, logy, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 1000})
        if res.fun <= best.fun + 1e-12:
            best = res
    if best is None:
        return np.full(len(bounds), np.nan), False, "no start gave a finite loss"
    return best.x, bool(best.success), str(best.message)


def _bounds(logy: np.ndarray, m: int, alpha_bounds: tuple[float, float]) -> list[tuple[float, float]]:
    # Loose log-space boxes: wide enough never to bind on sane data, tight enough that
    # exp() stays finite. e may not exceed log(max L): E above every loss is meaningless.
    lo, hi = float(logy.min()), float(logy.max())
    return [(lo - 30.0, hi)] + [(lo - 30.0, hi + 30.0), alpha_bounds] * m


def _quality(Z, logy, theta) -> tuple[float, float]:
    r = _terms(theta, Z)[0] - logy
    ss_tot = float(((logy - logy.mean()) ** 2).sum())
    return float(np.sqrt(np.mean(r**2))), (1.0 - float((r**2).sum()) / ss_tot) if ss_tot > 0 else math.nan


def _check_xy(arrays: dict[str, np.ndarray], where: str) -> None:
    for name, v in arrays.items():
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise FitError(f"{where}{name} must be finite and > 0; {int(bad.sum())} value(s) are not "
                           f"(first: {v[i]!r} at position {i})")


def _where(group: Any) -> str:
    return "" if group is None else f"group {group!r}: "


def _ci(samples: np.ndarray, level: float) -> list[tuple[float, float]]:
    if len(samples) < 2:
        return [(math.nan, math.nan)] * samples.shape[1]
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    return [tuple(float(v) for v in np.percentile(samples[:, j], q)) for j in range(samples.shape[1])]


def _fit_lse(Xs, xnames, y, names, alpha_bounds, huber_delta, n_boot, seed, level, group, strict):
    """Shared path for both forms: validate, normalise, multi-start fit, bootstrap, flags."""
    with _one_blas_thread():
        return _fit_lse_inner(Xs, xnames, y, names, alpha_bounds, huber_delta, n_boot, seed, level, group, strict)


def _fit_lse_inner(Xs, xnames, y, names, alpha_bounds, huber_delta, n_boot, seed, level, group, strict):
    where = _where(group)
    y = np.asarray(y, dtype=float)
    Xs = [np.asarray(x, dtype=float) for x in Xs]
    if any(x.shape != y.shape for x in Xs) or y.ndim != 1:
        raise FitError(f"{where}x and y must be 1-D arrays of the same length")
    _check_xy({**dict(zip(xnames, Xs, strict=True)), "y": y}, where)
    m, n_par = len(Xs), 1 + 2 * len(Xs)
    n_distinct = [len(np.unique(x)) for x in Xs]
    need = 3  # each power term needs 3 distinct levels: 2 only pin a difference, not A and alpha
    if len(y) < n_par or min(n_distinct) < need:
        raise FitError(f"{where}need at least {n_par} points with {need} distinct values of each x to fit "
                       f"{', '.join(names)}; got {len(y)} points ({', '.join(map(str, n_distinct))} distinct x)")
    logg = np.array([np.log(x).mean() for x in Xs])  # log geometric means: X / g is scale-free
    Z = np.column_stack([np.log(x) - lg for x, lg in zip(Xs, logg, strict=True)])
    logy = np.log(y)
    bounds = _bounds(logy, m, alpha_bounds)
    grid = _grid(logy, m)
    theta, ok, msg = _minimise(Z, logy, _screen(grid, Z, logy, huber_delta, keep=5), bounds, huber_delta)
    warns = []
    if not ok:
        if strict:
            raise FitError(f"{where}the fit did not converge ({msg}); check the data or widen alpha_bounds")
        warns.append(f"the fit did not converge ({msg}): do not trust this curve")

    def user(th: np.ndarray) -> np.ndarray:
        # A X^-alpha = exp(a) (X/g)^-alpha  =>  A = exp(a + alpha log g).
        out = [math.exp(th[0])]
        for j in range(m):
            out += [math.exp(th[1 + 2 * j] + th[2 + 2 * j] * logg[j]), th[2 + 2 * j]]
        return np.array(out)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if min(len(np.unique(x[idx])) for x in Xs) < need:
            continue
        # A resample's optimum lies near the full-data one, so start there; the screened grid
        # is the fallback when that start does not converge.
        th, ok_b, _ = _minimise(Z[idx], logy[idx], [theta], bounds, huber_delta)
        if not ok_b:
            th, ok_b, _ = _minimise(Z[idx], logy[idx], _screen(grid, Z[idx], logy[idx], huber_delta, 3),
                                    bounds, huber_delta)
        if ok_b:
            samples.append(user(th))
    boot = np.array(samples).reshape(-1, n_par)
    params = user(theta)
    rmse, r2 = _quality(Z, logy, theta)
    for j in range(m):
        al, nm = theta[2 + 2 * j], names[2 + 2 * j]
        if min(abs(al - alpha_bounds[0]), abs(al - alpha_bounds[1])) < 1e-3:
            warns.append(f"{nm}={al:.4g} is at its bound {alpha_bounds}; the fit is not trustworthy")
    if params[0] < 1e-3 * y.min():
        warns.append("E ~ 0: the data show no saturation, so E is unconstrained (a pure power law fits)")
    if n_boot and len(boot) < 0.8 * n_boot:
        warns.append(f"only {len(boot)}/{n_boot} bootstrap refits succeeded; the CIs are rough")
    if len(y) < n_par + 2:
        warns.append(f"only {len(y)} points for {n_par} parameters; CIs and extrapolation are unreliable")
    return params, dict(zip(names, _ci(boot, level), strict=True)), rmse, r2, ok, warns, boot


# ---------------------------------------------------------------------------- power law


def fit_power_law(x, y, *, huber_delta: float = 1e-3, n_boot: int = 200, seed: int = 0,
                  alpha_bounds: tuple[float, float] = (0.0, 3.0), level: float = 0.95,
                  group: Any = None, strict: bool = True) -> PowerLawFit:
    """Fit L = E + A x^-alpha (robust, multi-start, bootstrap CIs); raises FitError on bad data."""
    p, ci, rmse, r2, ok, warns, boot = _fit_lse([x], ["x"], y, ("E", "A", "alpha"), alpha_bounds, huber_delta,
                                                n_boot, seed, level, group, strict)
    return PowerLawFit(E=float(p[0]), A=float(p[1]), alpha=float(p[2]), ci=ci, n=len(np.asarray(y)),
                       rmse_log=rmse, r2_log=r2, converged=ok, n_boot=n_boot, n_boot_ok=len(boot),
                       warnings=warns, group=group, boot=boot)


def _log_curve(E, A, alpha, x) -> np.ndarray:
    # log(E + A x^-alpha) via LSE so large A and tiny x never overflow.
    x = np.asarray(x, dtype=float)
    E, A, alpha = (np.asarray(v, dtype=float)[..., None] for v in (E, A, alpha))
    return np.logaddexp(np.log(E), np.log(A) - alpha * np.log(x))


def predict(fit: PowerLawFit, x) -> np.ndarray:
    """L_hat(x) = E + A x^-alpha."""
    return np.exp(_log_curve(fit.E, fit.A, fit.alpha, x))


def prediction_band(fit: PowerLawFit, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise (lo, hi) band of the curve at x from the bootstrap parameter samples."""
    if fit.boot is None or len(fit.boot) < 2:
        raise FitError("no bootstrap samples to draw a band from; fit with n_boot > 0")
    curves = np.exp(_log_curve(fit.boot[:, 0], fit.boot[:, 1], fit.boot[:, 2], x))  # (n_boot_ok, len(x))
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    lo, hi = np.percentile(curves, q, axis=0)
    return lo, hi


# ---------------------------------------------------------------------------- Chinchilla


def fit_chinchilla(n, d, y, *, huber_delta: float = 1e-3, n_boot: int = 100, seed: int = 0,
                   alpha_bounds: tuple[float, float] = (0.0, 3.0), level: float = 0.95,
                   group: Any = None, strict: bool = True) -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta (Hoffmann et al. approach 3); raises FitError on bad data."""
    names = ("E", "A", "alpha", "B", "beta")
    p, ci, rmse, r2, ok, warns, boot = _fit_lse([n, d], ["N", "D"], y, names, alpha_bounds, huber_delta,
                                                n_boot, seed, level, group, strict)
    return ChinchillaFit(*map(float, p), ci=ci, n=len(np.asarray(y)), rmse_log=rmse, r2_log=r2, converged=ok,
                         n_boot=n_boot, n_boot_ok=len(boot), warnings=warns, group=group, boot=boot)


def predict_chinchilla(fit: ChinchillaFit, n, d) -> np.ndarray:
    """L_hat(N, D) = E + A/N^alpha + B/D^beta."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return fit.E + fit.A * n ** -fit.alpha + fit.B * d ** -fit.beta


@dataclass
class ComputeOptimal:
    """The allocation of a compute budget C = k N D that minimises the fitted L(N, D)."""

    C: np.ndarray  # budgets, in the units of k * N * D (FLOPs for k = 6 and N params, D tokens)
    N_opt: np.ndarray
    D_opt: np.ndarray
    loss_opt: np.ndarray  # fitted loss at (N_opt, D_opt)
    a: float  # N_opt ~ C^a, a = beta / (alpha + beta)
    b: float  # D_opt ~ C^b, b = alpha / (alpha + beta)
    a_ci: tuple[float, float]  # from the bootstrap samples, NaN without them
    G: float


def compute_optimal(fit: ChinchillaFit, budgets, k: float = 6.0, level: float = 0.95) -> ComputeOptimal:
    """N_opt(C) = G (C/k)^a, D_opt = G^-1 (C/k)^b (Hoffmann et al. eq. 4)."""
    C = np.atleast_1d(np.asarray(budgets, dtype=float))
    _check_xy({"budget": C}, "")
    s = fit.alpha + fit.beta
    if not (fit.alpha > 0 and fit.beta > 0):
        raise FitError(f"compute-optimal allocation needs alpha, beta > 0; got {fit.alpha:.3g}, {fit.beta:.3g}")
    a, b = fit.beta / s, fit.alpha / s
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / s)
    n_opt, d_opt = G * (C / k) ** a, (C / k) ** b / G
    a_boot = fit.boot[:, 4] / (fit.boot[:, 2] + fit.boot[:, 4]) if fit.boot is not None and len(fit.boot) else np.array([])
    a_ci = _ci(a_boot[:, None], level)[0] if len(a_boot) else (math.nan, math.nan)
    return ComputeOptimal(C=C, N_opt=n_opt, D_opt=d_opt, loss_opt=predict_chinchilla(fit, n_opt, d_opt),
                          a=a, b=b, a_ci=a_ci, G=G)


# ---------------------------------------------------------------------------- checks and MoE views


@dataclass
class HoldoutResult:
    x_held: float  # the largest x, left out of the fit
    predicted: float
    actual: float  # mean loss at x_held (there may be repeats)
    rel_error: float  # (predicted - actual) / actual, signed
    fit: PowerLawFit


def holdout_largest(x, y, **fit_kwargs) -> HoldoutResult:
    """Fit on every x but the largest, predict the largest: an honest extrapolation check."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _check_xy({"x": x, "y": y}, _where(fit_kwargs.get("group")))
    if len(np.unique(x)) < 4:
        raise FitError(f"{_where(fit_kwargs.get('group'))}a held-out check needs at least 4 distinct x "
                       f"(3 to fit, 1 to predict); got {len(np.unique(x))}")
    fit_kwargs.setdefault("n_boot", 0)
    top = x == x.max()
    fit = fit_power_law(x[~top], y[~top], **fit_kwargs)
    pred, actual = float(predict(fit, x.max())[0]), float(y[top].mean())
    return HoldoutResult(x_held=float(x.max()), predicted=pred, actual=actual, rel_error=(pred - actual) / actual, fit=fit)


@dataclass
class EffectiveParams:
    n_moe: float
    loss_moe: float
    n_equiv: float  # dense parameters whose fitted loss equals loss_moe; NaN with a reason if none
    multiplier: float  # n_equiv / n_moe
    reason: str = ""


def effective_params(dense: PowerLawFit, n_moe: float, loss_moe: float) -> EffectiveParams:
    """Invert the dense fit at the MoE loss: N_equiv = (A / (L_moe - E))^(1/alpha).

    Pass activated parameters as n_moe to read the multiplier as "dense parameters bought per
    activated parameter", or total parameters for "per stored parameter".
    """
    _check_xy({"n_moe": np.array([n_moe]), "loss_moe": np.array([loss_moe])}, "")
    if loss_moe <= dense.E:
        return EffectiveParams(n_moe, loss_moe, math.nan, math.nan,
                               f"loss {loss_moe:.4g} is at or below the dense asymptote E={dense.E:.4g}: "
                               "no dense size reaches it")
    n_eq = (dense.A / (loss_moe - dense.E)) ** (1 / dense.alpha)
    return EffectiveParams(n_moe, loss_moe, n_eq, n_eq / n_moe)


@dataclass
class SpeedUp:
    target_loss: float  # the dense run's final (smoothed) loss
    x_dense_final: float
    x_moe: float | None  # where the MoE curve first reaches target_loss; None if never
    fraction: float | None  # x_moe / x_dense_final
    speedup: float | None  # 1 / fraction
    reason: str = ""


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    # Centred moving mean, truncated at the ends (no lag in the middle of the curve; the last
    # point averages the final window//2 + 1 points, which only damps its noise).
    if window <= 1:
        return y
    h = window // 2
    c = np.concatenate([[0.0], np.cumsum(y)])
    lo, hi = np.maximum(np.arange(len(y)) - h, 0), np.minimum(np.arange(len(y)) + h + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def convergence_speedup(x_dense, loss_dense, x_moe, loss_moe, *, smooth: int = 1) -> SpeedUp:
    """How much sooner (in steps or FLOPs) the MoE curve reaches the dense run's final loss."""
    curves = {}
    for name, (x, y) in {"dense": (x_dense, loss_dense), "moe": (x_moe, loss_moe)}.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
            raise FitError(f"{name} curve needs x and loss of the same length, at least 2 points")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise FitError(f"{name} curve has non-finite x or loss values; drop them first")
        if np.any(np.diff(x) <= 0):
            raise FitError(f"{name} curve x must be strictly increasing (sort it, drop duplicate steps)")
        curves[name] = (x, _smooth(y, smooth))
    (xd, ld), (xm, lm) = curves["dense"], curves["moe"]
    target, x_final = float(ld[-1]), float(xd[-1])
    hit = np.flatnonzero(lm <= target)
    if len(hit) == 0:
        return SpeedUp(target, x_final, None, None, None,
                       f"the MoE curve never reaches the dense final loss {target:.4g} (its best: {lm.min():.4g})")
    i = int(hit[0])
    if i == 0:
        x_hit = float(xm[0])
    else:  # linear interpolation between the last point above the target and the first at/below
        t = (lm[i - 1] - target) / (lm[i - 1] - lm[i])
        x_hit = float(xm[i - 1] + t * (xm[i] - xm[i - 1]))
    frac = x_hit / x_final
    return SpeedUp(target, x_final, x_hit, frac, 1 / frac if frac > 0 else math.inf)


# ---------------------------------------------------------------------------- tables


def _numeric_column(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        raise FitError(f"no column '{col}' in the table{did_you_mean(col, map(str, df.columns))}; "
                       f"available: {', '.join(map(str, df.columns))}")
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce")
    bad = vals.isna() & raw.notna()
    if bad.any():
        examples = ", ".join(repr(v) for v in raw[bad].unique()[:3])
        raise FitError(f"column '{col}' is not numeric: {int(bad.sum())} value(s) like {examples}")
    if vals.isna().any():
        rows = list(df.index[vals.isna()][:5])
        raise FitError(f"column '{col}' has {int(vals.isna().sum())} missing value(s) (rows {rows}); "
                       "drop or fill them first")
    return vals.to_numpy(dtype=float)


def fit_table(df: pd.DataFrame, x: str, y: str, group: str | None = None, *, n_boot: int = 200,
              seed: int = 0, **fit_kwargs) -> list[PowerLawFit]:
    """One power-law fit of y against x per value of `group` (or one fit for the whole table)."""
    if df is None or len(df) == 0:
        raise FitError("the table is empty: no rows to fit")
    xs, ys = _numeric_column(df, x), _numeric_column(df, y)
    if group is None:
        return [fit_power_law(xs, ys, n_boot=n_boot, seed=seed, **fit_kwargs)]
    if group not in df.columns:
        raise FitError(f"no group column '{group}' in the table{did_you_mean(group, map(str, df.columns))}; "
                       f"available: {', '.join(map(str, df.columns))}")
    out = []
    for key, idx in df.groupby(group, sort=True, dropna=False).indices.items():
        out.append(fit_power_law(xs[idx], ys[idx], n_boot=n_boot, seed=seed, group=key, **fit_kwargs))
    return out


def results_to_frame(results: Sequence[PowerLawFit | ChinchillaFit]) -> pd.DataFrame:
    """One row per fit: parameters, their CI bounds, quality, convergence, warnings, group."""
    return pd.DataFrame([r.to_dict() for r in results])


def to_dict(result: Any) -> dict[str, Any]:
    """A plain JSON-able dict of any result in this module (bootstrap samples left out)."""
    if hasattr(result, "to_dict"):
        return result.to_dict()
    d = dataclasses.asdict(result)
    d.pop("fit", None)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
