"""The routing gap per model size, over seeds: what a reader of a scaling study asks first.

`by_size(runs, axes)` aggregates the done runs of each (size, series) cell over its replicates
(seeds): mean and standard deviation of the final validation loss, GenEval and FD-scenes.
`paired_gaps(...)` compares two series at every size they share, as the relative difference of
the final validation loss, (L_a - L_b) / L_b, paired by seed where both series ran the same
seeds (the seed fixes initialisation and data order, so paired gaps cancel part of the seed
noise), else between the cell means. `noise_sd` pools the per-seed spread of those gaps over the
sizes that have replicates, so a size trained with one seed can still be judged against the noise
the study measured elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ecdit_cli.study.labels import REPLICATE_AXES, series_labels, series_order, size_labels, size_order

CELL_COLUMNS = ["size", "series", "routing", "n", "loss_mean", "loss_sd", "loss_min", "loss_max",
                "params_active", "train_flops", "geneval_mean", "fd_mean"]  # fmt: skip
GAP_COLUMNS = ["size", "series", "reference", "n", "paired", "gap_mean", "gap_sd", "params_active"]


def _seed_column(runs: pd.DataFrame) -> str | None:
    return next((c for c in REPLICATE_AXES if c in runs.columns), None)


def labelled_done(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """The done runs with a final validation loss, with their size and series labels."""
    out = runs.assign(size=size_labels(runs, axes).astype(str), series=series_labels(runs, axes))
    ok = (out["status"] == "done") & out["final_val_loss"].gt(0)
    return out[ok]


def sample_sd(values: pd.Series) -> float:
    """Standard deviation over replicates (ddof 1); NaN for a single value."""
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def by_size(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per (size, series) with at least one done run, sizes small to large."""
    done = labelled_done(runs, axes)
    if done.empty:
        return pd.DataFrame(columns=CELL_COLUMNS)
    routing = done["routing"].astype(str) if "routing" in done else pd.Series("run", index=done.index)
    sizes = size_order(runs, size_labels(runs, axes).astype(str))
    order = series_order(runs, series_labels(runs, axes))
    rows = []
    for size in sizes:
        for s in order:
            cell = done[(done["size"] == size) & (done["series"] == s)]
            if cell.empty:
                continue
            loss = cell["final_val_loss"].astype(float)
            rows.append([size, s, routing[cell.index[0]], len(cell), float(loss.mean()), sample_sd(loss),
                         float(loss.min()), float(loss.max()), float(cell["params_active"].median()),
                         float(cell["train_flops"].median()), _mean(cell, "eval_overall"),
                         _mean(cell, "eval_fd_scenes")])  # fmt: skip
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def _mean(cell: pd.DataFrame, col: str) -> float:
    if col not in cell:
        return math.nan
    v = pd.to_numeric(cell[col], errors="coerce").dropna()
    return float(v.mean()) if len(v) else math.nan


def paired_gaps(runs: pd.DataFrame, axes: list[str], series: str, reference: str) -> pd.DataFrame:
    """`series` against `reference` at each size both have: relative gap of the final validation
    loss, mean and sd over seed pairs (negative: `series` reaches the lower loss)."""
    done = labelled_done(runs, axes)
    seed = _seed_column(done)
    rows = []
    for size in size_order(runs, size_labels(runs, axes).astype(str)):
        a = done[(done["size"] == size) & (done["series"] == series)]
        b = done[(done["size"] == size) & (done["series"] == reference)]
        if a.empty or b.empty:
            continue
        if seed is not None:
            pairs = a.merge(b, on=seed, suffixes=("", "_ref"))
        else:
            pairs = pd.DataFrame()
        if len(pairs):
            g = (pairs["final_val_loss"] - pairs["final_val_loss_ref"]) / pairs["final_val_loss_ref"]
            rows.append([size, series, reference, len(g), True, float(g.mean()), sample_sd(g),
                         float(a["params_active"].median())])  # fmt: skip
        else:  # different seeds: compare the cell means
            la, lb = float(a["final_val_loss"].mean()), float(b["final_val_loss"].mean())
            rows.append([size, series, reference, min(len(a), len(b)), False, (la - lb) / lb, math.nan,
                         float(a["params_active"].median())])  # fmt: skip
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


def noise_sd(gaps: pd.DataFrame) -> float:
    """The per-seed standard deviation of a gap, pooled over the sizes that have 2+ seed pairs."""
    rep = gaps[(gaps["n"] > 1) & gaps["gap_sd"].notna()]
    if rep.empty:
        return math.nan
    dof = (rep["n"] - 1).astype(float)
    return float(math.sqrt(float((dof * rep["gap_sd"] ** 2).sum() / dof.sum())))


@dataclass(frozen=True)
class Verdict:
    """Whether a gap is resolved: its mean further from 0 than twice its standard error."""

    gap: float
    stderr: float
    sign: int  # -1: lower loss than the reference, +1: higher, 0: within the noise

    @property
    def text(self) -> str:
        return {-1: "lower", 1: "higher", 0: "within noise"}[self.sign]


def verdict(gap_mean: float, gap_sd: float, n: int, pooled_sd: float) -> Verdict:
    """Judge a gap with its own seed spread when it has 2+ seeds, else with the study's pooled one."""
    sd = gap_sd if n > 1 and math.isfinite(gap_sd) else pooled_sd
    if not math.isfinite(sd):
        return Verdict(gap_mean, math.nan, 0)
    se = sd / math.sqrt(max(n, 1))
    sign = 0 if abs(gap_mean) <= 2 * se else (-1 if gap_mean < 0 else 1)
    return Verdict(gap_mean, se, sign)


def trend(gaps: pd.DataFrame) -> tuple[float, float, int] | None:
    """Least-squares slope of the gap against log10(activated parameters), its standard error,
    and the number of sizes (None with fewer than 3 sizes). Negative: the gap widens in the
    series' favour as the model grows."""
    g = gaps[np.isfinite(gaps["gap_mean"]) & gaps["params_active"].gt(0)]
    if len(g) < 3:
        return None
    x, y = np.log10(g["params_active"].to_numpy(float)), g["gap_mean"].to_numpy(float)
    w = g["n"].to_numpy(float)  # a cell of 3 seeds weighs 3 single runs
    xm, ym = np.average(x, weights=w), np.average(y, weights=w)
    sxx = float(np.sum(w * (x - xm) ** 2))
    slope = float(np.sum(w * (x - xm) * (y - ym)) / sxx)
    resid = y - (ym + slope * (x - xm))
    dof = max(len(g) - 2, 1)
    se = float(math.sqrt(np.sum(w * resid**2) / dof / sxx))
    return slope, se, len(g)
