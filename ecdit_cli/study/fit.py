"""Scaling-law fits as pure functions on arrays and DataFrames.

Forms:
- Saturating power law (Kaplan et al. 2020, with an irreducible term): L(X) = E + A * X^-alpha.
- Chinchilla form (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^alpha + B / D^beta,
  and the compute-optimal allocation it implies for C = k * N * D (k = 6 by default):
  N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta / (alpha+beta), b = alpha / (alpha+beta).

Both are fitted as Hoffmann et al. do: a Huber loss (delta 1e-3) on log residuals with
log L_hat = LSE(e, a_1 - alpha_1 log X_1, ...), minimised by L-BFGS-B from a grid of starts,
with bootstrap percentile intervals. Each X is divided by its geometric mean before fitting so
starts and bounds do not depend on the user's units; A and B are reported in those units.
The MoE views built on these fits (effective parameters, speed-ups) are in gains.py.
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

try:  # optional, speed only: SciPy >= 1.15's C L-BFGS-B runs 7-50x slower with a multi-threaded
    # OpenBLAS on tiny problems (scipy/scipy#22438); botorch's fix is this one-thread limit.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


class FitError(EcditError):
    """Data that cannot be fitted: too few points, bad values, a missing column, no convergence."""


@dataclass
class PowerLawFit:
    """L(X) = E + A * X^-alpha, with A in the units of the X that was fitted."""

    E: float
    A: float
    alpha: float
    ci: dict[str, tuple[float, float]]  # bootstrap percentile interval per parameter (NaN if none)
    n: int  # points fitted
    rmse_log: float  # RMSE of log(L_hat) - log(L)
    r2_log: float  # R^2 in log L
    converged: bool  # False only with strict=False (strict fits raise instead)
    n_boot: int  # bootstrap refits attempted
    n_boot_ok: int  # ... and how many converged (the intervals come from these)
    warnings: list[str] = field(default_factory=list)
    group: Any = None
    boot: np.ndarray | None = field(default=None, repr=False, compare=False)  # (n_boot_ok, 3): E, A, alpha
    exact: bool = False  # no more distinct points than parameters: the curve interpolates, no intervals

    def to_dict(self) -> dict[str, Any]:
        return _fit_dict(self, ("E", "A", "alpha"))


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
    boot: np.ndarray | None = field(default=None, repr=False, compare=False)  # (n_boot_ok, 5) like E..beta
    exact: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _fit_dict(self, ("E", "A", "alpha", "B", "beta"))


def python_value(v: Any) -> Any:
    # JSON-able: numpy scalars and arrays to Python, NaN/inf to None (json allow_nan=False).
    if isinstance(v, (np.ndarray, list, tuple)):
        return [python_value(u) for u in (v.tolist() if isinstance(v, np.ndarray) else v)]
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fit_dict(fit: PowerLawFit | ChinchillaFit, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"group": python_value(fit.group)}
    for k in names:
        out[k], (out[f"{k}_lo"], out[f"{k}_hi"]) = python_value(getattr(fit, k)), python_value(fit.ci[k])
    for k in ("n", "rmse_log", "r2_log", "converged", "n_boot", "n_boot_ok", "warnings"):
        out[k] = python_value(getattr(fit, k))
    return out


# ---------------------------------------------------------------------------- core optimiser
# theta = (e, a_1, alpha_1, ..., a_m, alpha_m) on covariates z_j = log(X_j / g_j), and
# r_i = LSE(e, a_j - alpha_j z_ij) - log L_i: the LSE keeps every term positive without
# constraints and never overflows, whatever the scale of X (Hoffmann et al. 2022, sec. 3.3).


def _lse_terms(theta: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L_hat for starts theta (..., 1 + 2m) at Z (n, m): shape (..., n), plus softmax weights."""
    theta = np.asarray(theta)
    T = np.concatenate([np.broadcast_to(theta[..., None, :1], (*theta.shape[:-1], len(Z), 1)),
                        theta[..., None, 1::2] - theta[..., None, 2::2] * Z], axis=-1)  # (..., n, 1 + m)
    # Hand-written LSE: scipy.special.logsumexp costs ~0.5 ms per call on arrays this small.
    top = T.max(axis=-1, keepdims=True)
    ex = np.exp(T - top)
    tot = ex.sum(axis=-1, keepdims=True)
    return (top + np.log(tot))[..., 0], ex / tot


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    # Divided by delta: the same minimiser, but values of order |r| / delta keep L-BFGS-B's
    # relative stopping test meaningful when delta is tiny.
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2 / delta, a - 0.5 * delta).mean(axis=-1)


def _objective(theta: np.ndarray, Z: np.ndarray, logy: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    lhat, w = _lse_terms(theta, Z)
    r = lhat - logy
    dr = np.clip(r, -delta, delta) / (delta * len(r))  # d huber / d r
    grad = np.empty_like(theta)
    grad[0] = dr @ w[:, 0]
    grad[1::2] = dr @ w[:, 1:]
    grad[2::2] = -(dr[:, None] * w[:, 1:] * Z).sum(axis=0)
    return float(_huber(r, delta)), grad


def _grid(logy: np.ndarray, m: int) -> np.ndarray:
    """Scale-free starts (S, 1 + 2m): E as a fraction of min L, exponents, and the A/B split."""
    lmin, lmid = math.exp(logy.min()), math.exp(np.median(logy))
    alphas = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0) if m == 1 else (0.1, 0.25, 0.5, 0.8, 1.2)
    splits = [(1.0,)] if m == 1 else [(f, 1 - f) for f in (0.2, 0.5, 0.8)]
    rows, e_fracs = [], (0.01, 0.2, 0.5, 0.8, 0.95)
    for ef, split, als in itertools.product(e_fracs, splits, itertools.product(alphas, repeat=m)):
        # Each term starts at its share of the reducible loss at the geometric-mean X (z = 0).
        rest = max(lmid - ef * lmin, 1e-3 * lmid)
        terms = [(math.log(f * rest), al) for f, al in zip(split, als, strict=True)]
        rows.append([math.log(ef * lmin), *itertools.chain(*terms)])
    return np.array(rows)


def _screen(grid: np.ndarray, Z: np.ndarray, logy: np.ndarray, delta: float, keep: int) -> np.ndarray:
    # Running L-BFGS-B from every grid point (as Hoffmann et al. do) costs 10-60x more and lands
    # in the same optimum on these small, smooth problems; polishing the best few grid points
    # still guards against a bad basin.
    return grid[np.argsort(_huber(_lse_terms(grid, Z)[0] - logy, delta))[:keep]]


def _minimise(Z, logy, starts, bounds, delta) -> tuple[np.ndarray, bool, str]:
    """Best of L-BFGS-B runs from each start; converged if the best run says so."""
    lo, hi = np.array(bounds).T
    best = None
    for x0 in starts:
        res = minimize(_objective, np.clip(x0, lo, hi), args=(Z, logy, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 1000})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        return np.full(len(bounds), np.nan), False, "no start gave a finite loss"
    if not best.success:
        # A Huber kink can stop the line search right at the optimum ("ABNORMAL_TERMINATION");
        # one restart from there either confirms the point or moves on.
        res = minimize(_objective, best.x, args=(Z, logy, delta), jac=True, method="L-BFGS-B", bounds=bounds)
        best = res if res.fun <= best.fun + 1e-12 else best
    return best.x, bool(best.success), str(best.message)


def check_positive(arrays: dict[str, np.ndarray], where: str = "") -> None:
    for name, v in arrays.items():
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise FitError(f"{where}{name} must be finite and > 0 for a log-space fit; {int(bad.sum())} "
                           f"value(s) are not (first: {float(v[i])} at position {i})")


def _ci(samples: np.ndarray, level: float) -> list[tuple[float, float]]:
    if len(samples) < 2:
        return [(math.nan, math.nan)] * samples.shape[1]
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    return [tuple(float(v) for v in np.percentile(samples[:, j], q)) for j in range(samples.shape[1])]


def _fit_lse(Xs, xnames, y, names, *, alpha_bounds, huber_delta, n_boot, seed, level, group, strict):
    """Shared path of both forms: validate, normalise, multi-start fit, bootstrap, flags."""
    where = "" if group is None else f"group {group!r}: "
    if not 0 <= alpha_bounds[0] < alpha_bounds[1]:
        raise FitError(f"alpha_bounds={alpha_bounds} must satisfy 0 <= low < high")
    if not huber_delta > 0:
        raise FitError(f"huber_delta={huber_delta} must be > 0")
    y, Xs = np.asarray(y, dtype=float), [np.asarray(x, dtype=float) for x in Xs]
    if y.ndim != 1 or any(x.shape != y.shape for x in Xs):
        raise FitError(f"{where}{', '.join(xnames)} and y must be 1-D arrays of the same length")
    check_positive({**dict(zip(xnames, Xs, strict=True)), "y": y}, where)
    m, n_par = len(Xs), 1 + 2 * len(Xs)
    n_distinct = [len(np.unique(x)) for x in Xs]
    # Each power term needs 3 distinct levels: 2 pin only a difference, not both A and alpha.
    if len(y) < n_par or min(n_distinct) < 3:
        raise FitError(f"{where}need at least {n_par} points with 3 distinct values of each of "
                       f"{', '.join(xnames)} to fit {', '.join(names)}; got {len(y)} points "
                       f"({'/'.join(map(str, n_distinct))} distinct)")
    logg = np.array([np.log(x).mean() for x in Xs])  # log geometric means
    Z, logy = np.column_stack([np.log(x) - lg for x, lg in zip(Xs, logg, strict=True)]), np.log(y)
    # Loose boxes: never binding on sane data, but keeping exp() finite; E above every loss is meaningless.
    bounds = [(logy.min() - 30, logy.max())] + [(logy.min() - 30, logy.max() + 30), alpha_bounds] * m

    def user(th: np.ndarray) -> np.ndarray:
        # A X^-alpha = exp(a) (X/g)^-alpha, so A = exp(a + alpha log g) in the user's units.
        out = th.copy()
        out[0], out[1::2] = math.exp(th[0]), np.exp(th[1::2] + th[2::2] * logg)
        return out

    grid, rng, samples = _grid(logy, m), np.random.default_rng(seed), []
    with threadpool_limits(1, "blas") if threadpool_limits else contextlib.nullcontext():
        theta, ok, msg = _minimise(Z, logy, _screen(grid, Z, logy, huber_delta, keep=5), bounds, huber_delta)
        if not ok and strict:
            raise FitError(f"{where}the fit did not converge ({msg}); check the data or widen alpha_bounds")
        # With no more distinct points than parameters the fit passes through every point, and
        # so does every usable resample: the bootstrap would report zero-width intervals.
        exact = len(np.unique(np.column_stack([*Xs, y]), axis=0)) <= n_par
        for _ in range(0 if exact else n_boot):
            idx = rng.integers(0, len(y), len(y))
            if min(len(np.unique(x[idx])) for x in Xs) < 3:
                continue
            # A resample's optimum lies near the full-data one, so start there; the screened
            # grid is the fallback.
            th, ok_b, _ = _minimise(Z[idx], logy[idx], [theta] if ok else [], bounds, huber_delta)
            if not ok_b:
                starts = _screen(grid, Z[idx], logy[idx], huber_delta, keep=3)
                th, ok_b, _ = _minimise(Z[idx], logy[idx], starts, bounds, huber_delta)
            if ok_b:
                samples.append(user(th))
    boot, params = np.array(samples).reshape(-1, n_par), user(theta)
    r = _lse_terms(theta, Z)[0] - logy
    ss_tot = float(((logy - logy.mean()) ** 2).sum())
    warns = [] if ok else [f"the fit did not converge ({msg}): do not trust this curve"]
    for name, al in zip(names[2::2], theta[2::2], strict=True):
        if min(abs(al - b) for b in alpha_bounds) < 1e-3:
            warns.append(f"{name}={al:.4g} is at its bound {alpha_bounds}: the fit is not trustworthy")
    if params[0] < 1e-3 * y.min():
        warns.append("E ~ 0: the data show no saturation, so E is unconstrained (a pure power law fits)")
    if exact:
        warns.append(f"{len(y)} points for {n_par} parameters: the curve passes through every point, so it "
                     "has no confidence interval and no test of its form (add points)")
    elif n_boot and len(boot) < 0.8 * n_boot:
        warns.append(f"only {len(boot)}/{n_boot} bootstrap resamples gave a converged fit: rough intervals")
    if not exact and len(y) < n_par + 2:
        warns.append(f"only {len(y)} points for {n_par} parameters: intervals and extrapolation are rough")
    return dict(zip(names, map(float, params), strict=True)), dict(
        ci=dict(zip(names, _ci(boot, level), strict=True)), n=len(y), rmse_log=float(np.sqrt(np.mean(r**2))),
        r2_log=1 - float((r**2).sum()) / ss_tot if ss_tot > 0 else math.nan, converged=ok, n_boot=0 if exact else n_boot,
        n_boot_ok=len(boot), warnings=warns, group=group, boot=boot, exact=exact)


# ---------------------------------------------------------------------------- power law


def fit_power_law(x, y, *, huber_delta: float = 1e-3, n_boot: int = 200, seed: int = 0,
                  alpha_bounds: tuple[float, float] = (0.0, 3.0), level: float = 0.95,
                  group: Any = None, strict: bool = True) -> PowerLawFit:
    """Fit L = E + A x^-alpha (robust, multi-start, bootstrap CIs); raises FitError on bad data."""
    params, rest = _fit_lse([x], ["x"], y, ("E", "A", "alpha"), alpha_bounds=alpha_bounds,
                            huber_delta=huber_delta, n_boot=n_boot, seed=seed, level=level, group=group,
                            strict=strict)
    return PowerLawFit(**params, **rest)


def _log_curve(E, A, alpha, x) -> np.ndarray:
    # log(E + A x^-alpha) via logaddexp, so a large A (x in raw FLOPs) never overflows.
    E, A, alpha = (np.asarray(v, dtype=float)[..., None] for v in (E, A, alpha))
    return np.logaddexp(np.log(E), np.log(A) - alpha * np.log(np.asarray(x, dtype=float).ravel()))


def predict(fit: PowerLawFit, x) -> np.ndarray:
    """L_hat(x) = E + A x^-alpha, shaped like x."""
    return np.exp(_log_curve(fit.E, fit.A, fit.alpha, x)).reshape(np.shape(x))


def prediction_band(fit: PowerLawFit, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise (lo, hi) band of the fitted curve at 1-D x, from the bootstrap parameter samples."""
    if fit.exact:
        raise FitError(f"no bootstrap samples to draw a band from: {fit.n} points for 3 parameters, "
                       "the curve passes through every point")
    if fit.boot is None or len(fit.boot) < 2:
        raise FitError("no bootstrap samples to draw a band from: fit with n_boot > 0")
    curves = np.exp(_log_curve(fit.boot[:, 0], fit.boot[:, 1], fit.boot[:, 2], x))  # (n_boot_ok, len(x))
    lo, hi = np.percentile(curves, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return lo, hi


# ---------------------------------------------------------------------------- Chinchilla


def fit_chinchilla(n, d, y, *, huber_delta: float = 1e-3, n_boot: int = 100, seed: int = 0,
                   alpha_bounds: tuple[float, float] = (0.0, 3.0), level: float = 0.95,
                   group: Any = None, strict: bool = True) -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta (Hoffmann et al. approach 3); alpha_bounds bound beta too."""
    params, rest = _fit_lse([n, d], ["N", "D"], y, ("E", "A", "alpha", "B", "beta"),
                            alpha_bounds=alpha_bounds, huber_delta=huber_delta, n_boot=n_boot, seed=seed,
                            level=level, group=group, strict=strict)
    return ChinchillaFit(**params, **rest)


def predict_chinchilla(fit: ChinchillaFit, n, d) -> np.ndarray:
    """L_hat(N, D) = E + A/N^alpha + B/D^beta."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return fit.E + fit.A * n**-fit.alpha + fit.B * d**-fit.beta


@dataclass
class ComputeOptimal:
    """The split of each budget C = k N D that minimises the fitted L(N, D)."""

    C: np.ndarray  # budgets, in units of k * N * D (FLOPs for k = 6, N parameters, D tokens/images)
    N_opt: np.ndarray
    D_opt: np.ndarray
    loss_opt: np.ndarray  # fitted loss at (N_opt, D_opt)
    a: float  # N_opt ~ C^a, a = beta / (alpha + beta)
    b: float  # D_opt ~ C^b, b = alpha / (alpha + beta) = 1 - a
    a_ci: tuple[float, float]  # from the bootstrap samples; NaN without them
    G: float


def compute_optimal(fit: ChinchillaFit, budgets, k: float = 6.0, level: float = 0.95) -> ComputeOptimal:
    """N_opt(C) = G (C/k)^a, D_opt = G^-1 (C/k)^b (Hoffmann et al. 2022, eq. 4)."""
    C = np.atleast_1d(np.asarray(budgets, dtype=float))
    check_positive({"budget": C, "k": np.array([k])})
    if not (fit.alpha > 0 and fit.beta > 0):
        raise FitError(f"a compute-optimal split needs alpha, beta > 0; got {fit.alpha:.3g}, {fit.beta:.3g}")
    s = fit.alpha + fit.beta
    a, b = fit.beta / s, fit.alpha / s
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / s)
    n_opt, d_opt = G * (C / k) ** a, (C / k) ** b / G
    boot = fit.boot if fit.boot is not None else np.empty((0, 5))
    a_ci = _ci((boot[:, 4] / (boot[:, 2] + boot[:, 4]))[:, None], level)[0]
    return ComputeOptimal(C, n_opt, d_opt, predict_chinchilla(fit, n_opt, d_opt), a, b, a_ci, G)


# ---------------------------------------------------------------------------- checks and MoE views


@dataclass
class HoldoutResult:
    x_held: float  # the largest x, left out of the fit
    predicted: float
    actual: float  # mean loss at x_held (there may be repeats)
    rel_error: float  # (predicted - actual) / actual, signed
    fit: PowerLawFit  # the fit without x_held
    # 95% bootstrap band of the prediction, as relative errors (NaN without bootstrap refits)
    rel_error_ci: tuple[float, float] = (math.nan, math.nan)


def holdout_largest(x, y, **fit_kwargs) -> HoldoutResult:
    """Fit on every x but the largest, predict the largest: an honest extrapolation check."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    where = "" if fit_kwargs.get("group") is None else f"group {fit_kwargs['group']!r}: "
    check_positive({"x": x, "y": y}, where)
    if len(np.unique(x)) < 4:
        raise FitError(f"{where}a held-out check needs at least 4 distinct x (3 to fit, 1 to predict); "
                       f"got {len(np.unique(x))}")
    top = x == x.max()
    fit = fit_power_law(x[~top], y[~top], **{"n_boot": 0, **fit_kwargs})
    pred, actual = float(predict(fit, x.max())), float(y[top].mean())
    ci = (math.nan, math.nan)
    if not fit.exact and fit.boot is not None and len(fit.boot) >= 2:
        lo, hi = prediction_band(fit, np.array([x.max()]))
        ci = ((float(lo[0]) - actual) / actual, (float(hi[0]) - actual) / actual)
    return HoldoutResult(float(x.max()), pred, actual, (pred - actual) / actual, fit, ci)


# ---------------------------------------------------------------------------- tables


def _column(df: pd.DataFrame, col: str, what: str = "column") -> pd.Series:
    if col not in df.columns:
        raise FitError(f"no {what} '{col}' in the table{did_you_mean(col, map(str, df.columns))}; "
                       f"available: {', '.join(map(str, df.columns))}")
    return df[col]


def _positive_column(df: pd.DataFrame, col: str) -> np.ndarray:
    raw = _column(df, col)
    vals = pd.to_numeric(raw, errors="coerce")
    if (bad := vals.isna() & raw.notna()).any():
        examples = ", ".join(repr(v) for v in raw[bad].unique()[:3])
        raise FitError(f"column '{col}' is not numeric: {int(bad.sum())} value(s) like {examples}")
    if vals.isna().any():
        raise FitError(f"column '{col}' has {int(vals.isna().sum())} missing value(s) "
                       f"(rows {list(df.index[vals.isna()][:5])}): drop or fill them first")
    if (bad := ~np.isfinite(vals) | (vals <= 0)).any():
        first = df.index[bad.to_numpy()][0]
        raise FitError(f"column '{col}' must be finite and > 0 for a log-space fit; {int(bad.sum())} "
                       f"value(s) are not (first: {vals[first]} in row {python_value(first)!r})")
    return vals.to_numpy(dtype=float)


def fit_table(df: pd.DataFrame, x: str, y: str, group: str | None = None, *, n_boot: int = 200,
              seed: int = 0, **fit_kwargs) -> list[PowerLawFit]:
    """One power-law fit of column y against column x per value of `group` (or one overall)."""
    if df is None or len(df) == 0:
        raise FitError("the table is empty: no rows to fit")
    _column(df, x), _column(df, y)  # name every missing column before complaining about values
    keys = _column(df, group, "group column") if group is not None else pd.Series(0, index=df.index)
    xs, ys = _positive_column(df, x), _positive_column(df, y)
    return [fit_power_law(xs[idx], ys[idx], n_boot=n_boot, seed=seed,
                          group=None if group is None else key, **fit_kwargs)
            for key, idx in keys.groupby(keys.to_numpy(), sort=True, dropna=False).indices.items()]


def results_to_frame(results: Sequence[PowerLawFit | ChinchillaFit]) -> pd.DataFrame:
    """One row per fit: parameters, interval bounds, quality, convergence, warnings, group."""
    return pd.DataFrame([r.to_dict() for r in results])


def to_dict(result: Any) -> dict[str, Any]:
    """A plain JSON-able dict (NaN -> None) of any result here, without bootstrap samples or nested fits."""
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return {f.name: python_value(getattr(result, f.name)) for f in dataclasses.fields(result) if f.name != "fit"}
