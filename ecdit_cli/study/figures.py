"""Figures of a study: loss curves, scaling laws, per-timestep loss, routing statistics, evals.

Every function takes collected data (`collect.CollectResult` tables) and, for the scaling
figures, the fits of `ecdit_cli.study.fit`, and returns a matplotlib Figure; the caller saves it
(`figures.save_figure` writes PNG and SVG). One colour per routing across all figures (dense dark grey,
token choice blue, expert choice orange-red); within a routing, a lighter shade and a different
marker mark a smaller model, and a different line style another series (e.g. E=16 vs E=8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ecdit_cli.study.collect import EVAL_TASKS, CollectResult
from ecdit_cli.study.figure_style import (
    LOSS_LABEL,
    SERIES_STYLES,
    X_LABELS,
    Layout,
    finish,
    grid,
    routing_name,
    status_suffix,
    tidy_log_axis,
)

FIGURES = ("loss_vs_steps", "loss_vs_flops", "scaling_params", "scaling_flops", "loss_vs_timestep",
           "routing_stats", "eval_scores", "geneval_vs_training")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Loss curves


def loss_curves(data: CollectResult, x: str = "step") -> Figure:
    """Training (thin) and validation (markers) loss against steps or training FLOPs, one panel
    per model size, colour = routing. Runs that are not done are drawn dashed-thin and named."""
    lay = Layout(data)
    curves = data.curves
    wanted = curves[curves["metric"].isin(["train_loss", "val_loss"])]
    by_run = dict(tuple(wanted.groupby("run_id", sort=False)))
    logged = lay.runs["run_id"].isin(by_run)
    sizes = [s for s in lay.sizes if (logged & (lay.size == s)).any()]
    empty = [s for s in lay.sizes if s not in sizes]
    fig, axes = grid(len(sizes))
    notes = []
    for ax, size in zip(axes, sizes, strict=True):
        for i in lay.runs.index[lay.size == size]:
            row = lay.runs.loc[i]
            c = by_run.get(row["run_id"])
            if c is None or c.empty:
                continue
            s = lay.series[i]
            color, ls = lay.color(s), lay.linestyle(s)
            done = row["status"] == "done"
            tr = c[c["metric"] == "train_loss"].sort_values(x)
            va = c[c["metric"] == "val_loss"].sort_values(x)
            ax.plot(tr[x], tr["value"], color=color, ls=ls, lw=0.8, alpha=0.35)
            ax.plot(va[x], va["value"], color=color, ls=ls if done else ":", lw=1.6, marker="o", ms=3)
            if not done:
                notes.append(f"{row['run_id']}{status_suffix(row)}")
        ax.set_title(f"size {size}")
        ax.set_yscale("log")
        tidy_log_axis(ax, "y")
        if x != "step":
            ax.set_xscale("log")
            tidy_log_axis(ax, "x")
        ax.set_xlabel(X_LABELS.get(x, x) + (" (log scale)" if x != "step" else ""))
        ax.set_ylabel("loss (MSE of velocity, log scale)")
    handles = lay.series_legend() + [
        Line2D([], [], color="0.3", lw=0.8, alpha=0.5, label="training loss"),
        Line2D([], [], color="0.3", lw=1.6, marker="o", ms=3, label="validation loss"),
    ] + ([Line2D([], [], color="0.3", lw=1.6, ls=":", marker="o", ms=3, label="not finished")] if notes else [])
    what = "steps" if x == "step" else "training FLOPs"
    note = ("not finished: " + ", ".join(notes)) if notes else ""
    if empty:
        note += ("; " if note else "") + "no metrics yet for size " + ", ".join(map(str, empty))
    return finish(fig, f"Training and validation loss vs {what}", handles, note)


# ---------------------------------------------------------------------------------------------
# Scaling laws


def _fmt_law(fit: Any, unit: str) -> str:
    return f"L = {fit.E:.3g} + {fit.A:.3g}·{unit}$^{{-{fit.alpha:.3g}}}$"


def scaling(data: CollectResult, x: str, fits: Mapping[str, Any]) -> Figure:
    """Final validation loss of done runs against `x` (params_active or train_flops), log axes,
    with each series' fitted saturating power law and its bootstrap 95% band.

    `fits` maps a series label to a `fit.PowerLawFit`, or to a string saying why there is none.
    """
    from ecdit_cli.study.fit import FitError, predict, prediction_band

    lay = Layout(data)
    runs = lay.runs
    done = runs[(runs["status"] == "done") & runs["final_val_loss"].notna() & runs[x].gt(0)]
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    reasons, bands = [], 0
    for s in lay.series_order:
        pts = done[lay.series[done.index] == s]
        color = lay.color(s)
        for i in pts.index:
            sz = lay.size[i]
            ax.scatter(
                pts.at[i, x],
                pts.at[i, "final_val_loss"],
                color=color,
                marker=lay.marker(sz),
                s=42,
                edgecolor="white",
                linewidth=0.6,
                zorder=3,
            )
        fit = fits.get(s)
        if fit is None or isinstance(fit, str) or pts.empty:
            if len(pts):
                reasons.append(f"no fit for {lay.label(s)}: {fit or 'not fitted'}")
            continue
        grid = np.geomspace(pts[x].min() / 1.6, pts[x].max() * 1.6, 120)
        ax.plot(
            grid,
            predict(fit, grid),
            color=color,
            ls=lay.linestyle(s),
            lw=1.6,
            label=f"{lay.label(s)}: {_fmt_law(fit, 'N' if x.startswith('params') else 'C')}",
        )
        try:
            lo, hi = prediction_band(fit, grid)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15, lw=0)
            bands += 1
        except FitError as err:
            reasons.append(f"{lay.label(s)}: {err}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if not done.empty:
        ax.margins(x=0.08, y=0.08)
        ax.autoscale_view()
        tidy_log_axis(ax, "x")
        tidy_log_axis(ax, "y")
    ax.set_xlabel(X_LABELS.get(x, x) + " (log scale)")
    ax.set_ylabel("final " + LOSS_LABEL + " (log scale)")
    what = "activated parameters" if x == "params_active" else "training FLOPs"
    ax.set_title(
        f"Final validation loss vs {what}\nlines: fitted $L = E + A\\,X^{{-\\alpha}}$ per routing"
        + ("; shading: bootstrap 95% band" if bands else ""),
        fontsize=10,
    )
    if done.empty:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color=lay.color(s), marker="o", ls="", label=lay.label(s) + " (runs, no fit)")
        for s in lay.series_order
        if not hasattr(fits.get(s), "alpha") and (lay.series[done.index] == s).any()
    ]
    handles += [h for h in lay.size_legend() if h.get_label()[5:] in set(lay.size[done.index])]
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7.5)
    notes = list(reasons)
    not_done = int((runs["status"] != "done").sum())
    if not_done:
        notes.append(f"{not_done} run(s) not done are not shown")
    for k, line in enumerate(notes):
        fig.text(
            0.01, 0.01 + 0.028 * (len(notes) - 1 - k), line, fontsize=7.5, color="0.3", ha="left", va="bottom"
        )
    fig.tight_layout(rect=(0, 0.028 * len(notes), 1, 1))
    return fig


# ---------------------------------------------------------------------------------------------
# Per-timestep loss


def timestep_loss(data: CollectResult) -> Figure:
    """Final validation loss at each fixed timestep t, one panel per size, colour = routing."""
    lay = Layout(data)
    runs = lay.runs
    kcols = sorted((c for c in runs.columns if c.startswith("final_val_loss_t")), key=lambda c: int(c[16:]))
    has = runs[kcols].notna().any(axis=1) if kcols else pd.Series(False, index=runs.index)
    sizes = [s for s in lay.sizes if (has & (lay.size == s)).any()]
    fig, axes = grid(len(sizes))
    for ax, size in zip(axes, sizes, strict=True):
        for i in runs.index[has & (lay.size == size)]:
            row = runs.loc[i]
            y = row[kcols].to_numpy(dtype=float) if kcols else np.array([])
            t = np.array([row.get(f"val_t{k}", np.nan) for k in range(len(kcols))], dtype=float)
            if np.isnan(t).all():
                t = (np.arange(len(kcols)) + 0.5) / max(len(kcols), 1)
            ok = np.isfinite(y) & np.isfinite(t)
            s = lay.series[i]
            done = row["status"] == "done"
            ax.plot(
                t[ok],
                y[ok],
                color=lay.color(s),
                ls=lay.linestyle(s) if done else ":",
                marker="o",
                ms=3.5,
                lw=1.5,
                label=lay.label(s) + status_suffix(row),
            )
        ax.set_title(f"size {size}")
        ax.set_xlabel("timestep t (0 = data, 1 = noise)")
        ax.set_ylabel(LOSS_LABEL)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
    if not sizes:
        axes = [fig.add_subplot(111)]
        axes[0].text(0.5, 0.5, "no validation records yet", ha="center", va="center")
        axes[0].set_axis_off()
    return finish(fig, "Final validation loss per timestep (dotted: latest values of runs not done)", [])


# ---------------------------------------------------------------------------------------------
# Routing statistics


def _metric_panel(
    ax: Any,
    lay: Layout,
    curves: pd.DataFrame,
    routing: str,
    metric: str,
    scale: float = 1.0,
    std: str | None = None,
    peak: str | None = None,
) -> bool:
    drawn = False
    for i in lay.runs.index[lay.routing == routing]:
        row = lay.runs.loc[i]
        c = curves[(curves["run_id"] == row["run_id"]) & (curves["metric"] == metric)].sort_values("step")
        if c.empty:
            continue
        s, size = lay.series[i], lay.size[i]
        color = lay.sized_color(s, size)
        ax.plot(
            c["step"],
            c["value"] * scale,
            color=color,
            ls=lay.linestyle(s),
            lw=1.4,
            marker=lay.marker(size),
            markevery=max(1, len(c) // 6),
            ms=4,
            label=f"size {size}" + series_suffix(lay, s) + status_suffix(row),
        )
        if std is not None:
            sd = curves[(curves["run_id"] == row["run_id"]) & (curves["metric"] == std)].sort_values("step")
            if len(sd) == len(c):
                m, v = c["value"].to_numpy() * scale, sd["value"].to_numpy() * scale
                ax.fill_between(c["step"], m - v, m + v, color=color, alpha=0.15, lw=0)
        if peak is not None:
            pk = curves[(curves["run_id"] == row["run_id"]) & (curves["metric"] == peak)].sort_values("step")
            ax.plot(pk["step"], pk["value"] * scale, color=color, ls=":", lw=1.0)
        drawn = True
    if not drawn:
        ax.text(
            0.5,
            0.5,
            f"no {routing_name(routing).lower()} runs with this metric",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=8,
        )
    else:
        ax.legend(fontsize=7)
    ax.set_xlabel(X_LABELS["step"])
    return drawn


def series_suffix(lay: Layout, series: str) -> str:
    r = lay._routing_of(series)
    return series[len(r) :] if series.startswith(r) else ""


def routing_stats(data: CollectResult) -> Figure:
    """EC experts per token (mean ± std) and share of tokens no expert picked; TC share of
    dropped tokens and load imbalance; over training, shade/marker = size."""
    lay = Layout(data)
    fig, axs = plt.subplots(2, 2, figsize=(11, 7.4), squeeze=False)
    (a, b), (c, d) = axs
    curves = data.curves
    _metric_panel(
        a,
        lay,
        curves,
        "expert_choice",
        "ec_experts_per_token_mean",
        std="ec_experts_per_token_std",
        peak="ec_experts_per_token_max",
    )
    a.set_title("EC: experts per token (mean ± std over tokens; dotted: max)")
    a.set_ylabel("experts per token")
    _metric_panel(b, lay, curves, "expert_choice", "ec_unrouted_frac", scale=100)
    b.set_title("EC: tokens picked by no expert")
    b.set_ylabel("share of image tokens (%)")
    _metric_panel(c, lay, curves, "token_choice", "tc_dropped_frac", scale=100)
    c.set_title("TC: token-expert assignments dropped by capacity")
    c.set_ylabel("share dropped (%)")
    _metric_panel(d, lay, curves, "token_choice", "tc_load_imbalance")
    d.set_title("TC: load imbalance before capacity")
    d.set_ylabel("max expert load / mean load")
    d.axhline(1.0, color="0.5", lw=0.8, ls="--")
    return finish(fig, "Routing statistics over training (averaged over MoE layers)", [])


def race_stats(data: CollectResult) -> Figure:
    """Race runs over training: experts per token (mean ± std, dotted: max), the learned inference
    threshold, tokens no expert picked and the used share of the slot table."""
    lay = Layout(data)
    fig, axs = plt.subplots(2, 2, figsize=(11, 7.4), squeeze=False)
    (a, b), (c, d) = axs
    curves = data.curves
    _metric_panel(a, lay, curves, "race", "race_experts_per_token_mean", std="race_experts_per_token_std",
                  peak="race_experts_per_token_max")
    a.set_title("Race: experts per token (mean ± std over tokens; dotted: max)")
    a.set_ylabel("experts per token")
    _metric_panel(b, lay, curves, "race", "race_threshold")
    b.set_title("Race: learned inference threshold (EMA of the k-th score)")
    b.set_ylabel("softmax affinity")
    _metric_panel(c, lay, curves, "race", "race_unrouted_frac", scale=100)
    c.set_title("Race: tokens picked by no expert")
    c.set_ylabel("share of tokens (%)")
    _metric_panel(d, lay, curves, "race", "race_slot_fill", scale=100)
    d.set_title("Race: used share of the slot table (busiest expert = 100%)")
    d.set_ylabel("used slots (%)")
    return finish(fig, "Race routing over training (averaged over MoE layers)", [])


# ---------------------------------------------------------------------------------------------
# Evaluation scores


def eval_scores(data: CollectResult) -> Figure | None:
    """GenEval-style scores (%) per task, one panel per size, bars coloured by routing; None
    when no run has an eval.json."""
    lay = Layout(data)
    runs = lay.runs
    if "eval_overall" not in runs or runs["eval_overall"].notna().sum() == 0:
        return None
    tasks = [t for t in ("overall", *EVAL_TASKS) if f"eval_{t}" in runs]
    has = runs["eval_overall"].notna()
    sizes = [s for s in lay.sizes if (has & (lay.size == s)).any()]
    fig, axes = grid(len(sizes), width=5.2, height=3.4, ncols=2)
    for ax, size in zip(axes, sizes, strict=True):
        idx = list(runs.index[has & (lay.size == size)])
        idx.sort(key=lambda i: lay.series_order.index(lay.series[i]))
        width = 0.8 / len(idx)
        for j, i in enumerate(idx):
            vals = [100 * runs.at[i, f"eval_{t}"] for t in tasks]
            xs = np.arange(len(tasks)) - 0.4 + width * (j + 0.5)
            s = lay.series[i]
            ax.bar(
                xs,
                vals,
                width=width,
                color=lay.color(s),
                hatch=["", "//", "..", "xx"][SERIES_STYLES.index(lay.linestyle(s))],
                edgecolor="white",
                lw=0.4,
                label=lay.label(s),
            )
            # Values on the bars: scores near 0 (an undertrained model) are otherwise invisible.
            ax.bar_label(ax.containers[-1], fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(np.arange(len(tasks)))
        ax.set_xticklabels([t.replace("_", " ") for t in tasks], rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("images correct (%)")
        ax.set_title(f"size {size}")
        ax.grid(axis="x", visible=False)
    return finish(
        fig,
        "GenEval-style scores (overall = unweighted mean of the six tasks)",
        lay.series_legend([s for s in lay.series_order if (has & (lay.series == s)).any()]),
    )


def geneval_curves(data: CollectResult) -> Figure | None:
    """GenEval overall (%) of the in-training subsets (`train.eval_every`) against steps and
    against training FLOPs, one line per run (colour = routing, shade and marker = size); None
    when no run logged one."""
    lay = Layout(data)
    curves = data.curves
    ev = curves[curves["metric"] == "geneval_overall"]
    if ev.empty:
        return None
    fig, axes = grid(2, width=5.2, height=3.6, ncols=2)
    by_run = dict(tuple(ev.groupby("run_id", sort=False)))
    for ax, x in zip(axes, ("step", "flops"), strict=True):
        for i in lay.runs.index:
            c = by_run.get(lay.runs.at[i, "run_id"])
            if c is None:
                continue
            c = c.sort_values(x)
            s, size = lay.series[i], lay.size[i]
            ax.plot(c[x], 100 * c["value"], color=lay.sized_color(s, size), ls=lay.linestyle(s), lw=1.4,
                    marker=lay.marker(size), ms=4)
        if x == "flops":
            ax.set_xscale("log")
            tidy_log_axis(ax, "x")
        ax.set_xlabel(X_LABELS.get(x, x) + (" (log scale)" if x == "flops" else ""))
        ax.set_ylabel("GenEval overall (% of images correct)")
        ax.set_ylim(0, 100)
    runs_with = [s for s in lay.series_order if lay.runs["run_id"][lay.series == s].isin(by_run).any()]
    n_img = curves[curves["metric"] == "eval_images"]["value"]
    note = f"fixed prompt subset and sampling seed, EMA weights, {int(n_img.iloc[0])} images per point" if len(n_img) else ""
    logged = lay.runs["run_id"].isin(by_run)
    sizes_with = [z for z in lay.sizes if (logged & (lay.size == z)).any()]
    return finish(fig, "GenEval during training (the train.eval_every subset)",
                  lay.series_legend(runs_with) + lay.size_legend(sizes_with), note)


# ---------------------------------------------------------------------------------------------
# All figures


def make_figures(
    data: CollectResult, fits: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Figure]:
    """Every figure that has something to show, by file stem (see FIGURES).

    `fits` maps "params_active" / "train_flops" to the per-series fits given to `scaling`.
    """
    fits = fits or {}
    figs: dict[str, Figure] = {
        "loss_vs_steps": loss_curves(data, "step"),
        "loss_vs_flops": loss_curves(data, "flops"),
        "scaling_params": scaling(data, "params_active", fits.get("params_active", {})),
        "scaling_flops": scaling(data, "train_flops", fits.get("train_flops", {})),
        "loss_vs_timestep": timestep_loss(data),
    }
    routings = set(data.runs["routing"].astype(str)) if "routing" in data.runs else set()
    if routings & {"expert_choice", "token_choice"}:
        figs["routing_stats"] = routing_stats(data)
    if "race" in routings:
        figs["race_stats"] = race_stats(data)
    ev = eval_scores(data)
    if ev is not None:
        figs["eval_scores"] = ev
    during = geneval_curves(data)
    if during is not None:
        figs["geneval_vs_training"] = during
    return figs
