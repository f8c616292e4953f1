"""The numbers of a study report: scaling fits, held-out checks and MoE-vs-dense views.

`analyse(data)` computes, from collected runs and curves (`ecdit_cli.study.collect`), with the fits
of `ecdit_cli.study.fit`:
- per series, a saturating power law L = E + A X^-alpha of the final validation loss in
  activated parameters and in training FLOPs, and the held-out check (fit without the largest
  size, predict it);
- the effective-parameter multiplier of each done MoE run (dense parameters with the same
  loss on the dense fit) and its convergence speed-up against the dense run of the same size;
- the Chinchilla form L(N, D) = E + A/N^alpha + B/D^beta per series, fitted on every
  validation record (N = activated parameters, D = training images seen) when a series has
  at least 2 sizes and the curves give at least 2 budgets, with the compute-optimal
  allocation it implies.
Where a number cannot be computed the Analysis holds the reason instead, so a study in
progress still gets a report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecdit_cli.errors import EcditError
from ecdit_cli.study import gaps
from ecdit_cli.study.allocation import layer_table
from ecdit_cli.study.claims import Finding, findings
from ecdit_cli.study.collect import CollectResult
from ecdit_cli.study.fit import (
    ChinchillaFit,
    ComputeOptimal,
    FitError,
    HoldoutResult,
    PowerLawFit,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    fit_table,
    holdout_largest,
)
from ecdit_cli.study.gains import convergence_speedup, effective_params
from ecdit_cli.study.labels import series_labels, series_order, size_labels

FIT_X = {"params_active": "activated parameters", "train_flops": "training FLOPs"}
MIN_SIZES = 3  # a saturating power law has 3 parameters


@dataclass
class Analysis:
    """Every derived number of the report. Values that could not be computed hold a reason."""

    fits: dict[str, dict[str, PowerLawFit | str]]  # x column -> series -> fit or why not
    holdout: dict[str, dict[str, HoldoutResult | str]]
    effective: pd.DataFrame  # one row per done MoE run
    speedup: pd.DataFrame  # one row per MoE run with a dense run of the same size
    chinchilla: dict[str, ChinchillaResult | str] = field(default_factory=dict)  # series -> fit or why not
    notes: list[str] = field(default_factory=list)
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)  # gaps.by_size: per (size, series), over seeds
    vs_dense: pd.DataFrame = field(default_factory=pd.DataFrame)  # gaps.paired_gaps of every series vs dense
    head_to_head: pd.DataFrame = field(default_factory=pd.DataFrame)  # each EC series vs each TC series
    allocation: pd.DataFrame = field(default_factory=pd.DataFrame)  # allocation.layer_table
    claims: list[Finding] = field(default_factory=list)


@dataclass
class ChinchillaResult:
    fit: ChinchillaFit
    optimal: ComputeOptimal  # at the study's largest training budget and 10x and 100x it
    n_points: int


# ---------------------------------------------------------------------------------------------
# Numbers


def fit_groups(
    df: pd.DataFrame, x: str, y: str, group: str | None = None, *, n_boot: int = 200, seed: int = 0
) -> list[tuple[Any, PowerLawFit | str]]:
    """`fit.fit_table`, one group at a time: a group that cannot be fitted gets its reason
    instead of failing the others. Without `group`, one fit (errors propagate)."""
    if group is None:
        return [(None, fit_table(df, x, y, n_boot=n_boot, seed=seed)[0])]
    if group not in df.columns:
        fit_table(df, x, y, group, n_boot=0)  # raises FitError naming the missing column
    out: list[tuple[Any, PowerLawFit | str]] = []
    for key, idx in df.groupby(group, sort=True, dropna=False).indices.items():
        try:
            result = fit_table(df.iloc[idx], x, y, n_boot=n_boot, seed=seed)[0]
            result.group = key
            out.append((key, result))
        except FitError as err:
            out.append((key, str(err)))
    return out


def fit_csv(
    path: str | Path,
    x: str,
    y: str,
    group: str | None = None,
    *,
    n_boot: int = 200,
    seed: int = 0,
    all_rows: bool = False,
) -> tuple[list[tuple[Any, PowerLawFit | str]], list[str]]:
    """Fit a CSV file per group. Unless `all_rows`, a table with a `status` column (runs.csv)
    keeps only its done runs, and rows without x or y are left out; the notes say what was."""
    path = Path(path)
    if not path.is_file():
        raise EcditError(f"table not found: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EcditError(f"{path} is not a readable CSV: {err}") from None
    notes = []
    if not all_rows:
        if "status" in df.columns and (df["status"] != "done").any():
            notes.append(
                f"left out {int((df['status'] != 'done').sum())} row(s) whose status is not done "
                "(--all-rows keeps them)"
            )
            df = df[df["status"] == "done"]
        present = [c for c in (x, y) if c in df.columns]
        blank = df[present].isna().any(axis=1) if present else pd.Series(False, index=df.index)
        if blank.any():
            notes.append(f"left out {int(blank.sum())} row(s) without {' or '.join(present)}")
            df = df[~blank]
    return fit_groups(df.reset_index(drop=True), x, y, group, n_boot=n_boot, seed=seed), notes


def _done(runs: pd.DataFrame, x: str) -> pd.Series:
    return (runs["status"] == "done") & runs["final_val_loss"].gt(0) & runs[x].gt(0)


def analyse(data: CollectResult, n_boot: int = 200, seed: int = 0) -> Analysis:
    runs = data.runs
    series = series_labels(runs, data.axes)
    routing = runs["routing"].astype(str) if "routing" in runs else pd.Series("run", index=runs.index)
    fits: dict[str, dict[str, PowerLawFit | str]] = {}
    holdout: dict[str, dict[str, HoldoutResult | str]] = {}
    for x in FIT_X:
        fits[x], holdout[x] = {}, {}
        ok = _done(runs, x)
        for s in series_order(runs, series):
            pts = runs[ok & (series == s)]
            xs, ys = pts[x].to_numpy(dtype=float), pts["final_val_loss"].to_numpy(dtype=float)
            n_sizes = len(np.unique(xs))
            if n_sizes < MIN_SIZES:
                fits[x][s] = f"{n_sizes} size(s) done; a saturating power law needs at least {MIN_SIZES}"
            else:
                try:
                    fits[x][s] = fit_power_law(xs, ys, n_boot=n_boot, seed=seed, group=s)
                except FitError as err:
                    fits[x][s] = str(err)
            if n_sizes < MIN_SIZES + 1:
                holdout[x][s] = f"{n_sizes} size(s) done; the check needs at least {MIN_SIZES + 1}"
            else:
                try:
                    holdout[x][s] = holdout_largest(xs, ys, n_boot=n_boot, seed=seed, group=s)
                except FitError as err:
                    holdout[x][s] = str(err)
    notes: list[str] = []
    effective = _effective(runs, series, routing, fits["params_active"], notes)
    speedup = _speedups(data, series, routing)
    chinchilla = _chinchilla(data, series, routing, n_boot=min(n_boot, 50), seed=seed)
    cells = gaps.by_size(runs, data.axes)
    vs_dense, head_to_head = _comparisons(runs, data.axes, cells)
    allocation, warnings = layer_table(data.study_dir)
    notes += warnings
    claims = findings(runs, data.axes, speedup, allocation)
    return Analysis(fits, holdout, effective, speedup, chinchilla, notes, cells, vs_dense, head_to_head,
                    allocation, claims)


def _comparisons(runs: pd.DataFrame, axes: list[str], cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every series against the dense one (when there is exactly one), and every expert-choice
    series against every token-choice series, at the sizes they share."""
    empty = pd.DataFrame(columns=gaps.GAP_COLUMNS)
    if cells.empty:
        return empty, empty
    kinds = cells.drop_duplicates("series").set_index("series")["routing"]
    dense = [s for s, r in kinds.items() if r == "dense"]
    vs_dense = [gaps.paired_gaps(runs, axes, s, dense[0]) for s, r in kinds.items() if r != "dense"] if len(
        dense) == 1 else []  # fmt: skip
    ec = [s for s, r in kinds.items() if r == "expert_choice"]
    tc = [s for s, r in kinds.items() if r == "token_choice"]
    pairs = [gaps.paired_gaps(runs, axes, a, b) for a in ec for b in tc]
    join = lambda frames: pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(  # noqa: E731
        not f.empty for f in frames) else empty  # fmt: skip
    return join(vs_dense), join(pairs)


def _effective(runs, series, routing, fits, notes) -> pd.DataFrame:
    cols = ["run_id", "series", "params_active", "params_total", "final_val_loss", "dense_equiv_params",
            "multiplier_active", "multiplier_total", "reason", "note"]  # fmt: skip
    dense = [
        f for s, f in fits.items() if isinstance(f, PowerLawFit) and (routing[series == s] == "dense").all()
    ]
    moe = runs[_done(runs, "params_active") & routing.ne("dense")]
    if moe.empty:
        return pd.DataFrame(columns=cols)
    if len(dense) != 1:
        why = "no dense fit" if not dense else f"{len(dense)} dense fits (ambiguous reference)"
        notes.append(f"Effective-parameter multipliers not computed: {why}.")
        return pd.DataFrame(columns=cols)
    dense_sizes = runs.loc[_done(runs, "params_active") & routing.eq("dense"), "params_active"].astype(float)
    dense_range = (float(dense_sizes.min()), float(dense_sizes.max()))
    rows = []
    for i, r in moe.iterrows():
        e = effective_params(dense[0], float(r["params_active"]), float(r["final_val_loss"]), dense_range)
        rows.append(
            [
                r["run_id"],
                series[i],
                r["params_active"],
                r["params_total"],
                r["final_val_loss"],
                e.n_equiv,
                e.multiplier,
                e.n_equiv / r["params_total"],
                e.reason,
                e.note,
            ]
        )
    return pd.DataFrame(rows, columns=cols)


def _val_curve(curves: pd.DataFrame, run_id: str) -> pd.DataFrame:
    c = curves[(curves["run_id"] == run_id) & (curves["metric"] == "val_loss")]
    c = c[np.isfinite(c["value"]) & np.isfinite(c["step"])].sort_values("step")
    return c.drop_duplicates("step", keep="last")


def _speedups(data: CollectResult, series: pd.Series, routing: pd.Series) -> pd.DataFrame:
    """Steps and FLOPs an MoE run needs to reach the final validation loss of the dense run of
    the same size (same seed where there is a choice), as a fraction of the dense run's."""
    runs = data.runs
    size = size_labels(runs, data.axes)
    cols = ["run_id", "series", "size", "dense_run", "target_loss", "steps_fraction", "flops_fraction",
            "speedup_steps", "reason"]  # fmt: skip
    rows = []
    for i, r in runs[routing.ne("dense")].iterrows():
        dense = runs[(routing == "dense") & (size == size[i]) & (runs["status"] == "done")]
        if "seed" in dense and (dense["seed"] == r.get("seed")).any():
            dense = dense[dense["seed"] == r.get("seed")]
        if dense.empty:
            continue
        d = dense.iloc[0]
        dc, mc = _val_curve(data.curves, d["run_id"]), _val_curve(data.curves, r["run_id"])
        base = [r["run_id"], series[i], size[i], d["run_id"]]
        if len(dc) < 2 or len(mc) < 2:
            rows.append(base + [math.nan] * 4 + ["fewer than 2 validation records"])
            continue
        try:
            by_step = convergence_speedup(dc["step"], dc["value"], mc["step"], mc["value"])
            by_flops = convergence_speedup(dc["flops"], dc["value"], mc["flops"], mc["value"])
        except FitError as err:
            rows.append(base + [math.nan] * 4 + [str(err)])
            continue
        reason = by_step.reason
        if reason and r["status"] == "failed":
            reason = f"not reached before it failed at step {int(r['step'])}"
        elif reason and r["status"] != "done":
            reason = f"not reached yet ({r['status']} at step {int(r['step'])})"
        rows.append(
            base
            + [
                by_step.target_loss,
                _nan(by_step.fraction),
                _nan(by_flops.fraction),
                _nan(by_step.speedup),
                reason,
            ]
        )
    return pd.DataFrame(rows, columns=cols)


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)



CHINCHILLA_MIN_POINTS = 7  # 5 parameters, plus room for the bootstrap


def _chinchilla(data: CollectResult, series: pd.Series, routing: pd.Series, n_boot: int,
                seed: int) -> dict[str, ChinchillaResult | str]:
    """L(N, D) per series on validation records past 20% of each run (N = activated params,
    D = images seen). Using points along the curves, not only final losses, is what makes a
    single-budget study usable; with a decaying learning rate the intermediate points are
    pessimistic, which the report says."""
    runs, curves = data.runs, data.curves
    out: dict[str, ChinchillaResult | str] = {}
    for r in series_order(runs, series):
        ids = runs[(series == r) & runs["status"].isin(["done", "running", "interrupted"])]
        if ids["run_id"].nunique() == 0:
            continue
        pts = []
        for _, run in ids.iterrows():
            c = curves[(curves["run_id"] == run["run_id"]) & (curves["metric"] == "val_loss")]
            c = c[np.isfinite(c["value"]) & (c["images_seen"] > 0)]
            if c.empty:
                continue
            c = c[c["step"] >= 0.2 * c["step"].max()]
            for _, row in c.iterrows():
                pts.append((float(run["params_active"]), float(row["images_seen"]), float(row["value"])))
        n_sizes = len({p[0] for p in pts})
        n_budgets = len({p[1] for p in pts})
        if n_sizes < 2 or n_budgets < 2 or len(pts) < CHINCHILLA_MIN_POINTS:
            out[r] = (f"{n_sizes} size(s), {n_budgets} budget(s), {len(pts)} point(s): L(N, D) needs at least "
                      f"2 sizes, 2 budgets and {CHINCHILLA_MIN_POINTS} points")
            continue
        n, d, y = (np.array(v) for v in zip(*pts, strict=False))
        try:
            fit = fit_chinchilla(n, d, y, n_boot=n_boot, seed=seed, group=r, strict=True)
        except FitError as err:
            out[r] = str(err)
            continue
        # Budgets in training FLOPs: C = k N D with k = 3 x forward FLOPs per image / activated
        # parameters (about 6 x tokens per image, plus attention), the median over the runs.
        sel = runs[series == r]
        k = float(np.nanmedian(3.0 * sel["flops_per_image"] / sel["params_active"]))
        c_max = float(np.max(n * d)) * k
        try:
            opt = compute_optimal(fit, [c_max, 10 * c_max, 100 * c_max], k=k)
        except FitError as err:
            out[r] = f"fitted, but no compute-optimal split: {err}"
            continue
        out[r] = ChinchillaResult(fit, opt, len(pts))
    return out
