"""The study report: fits, held-out checks and MoE-vs-dense views, written as Markdown and HTML.

`analyse(data)` computes every number (per-series saturating power laws of the final
validation loss in activated parameters and in training FLOPs, the held-out check, the
effective-parameter multiplier and the convergence speed-up of each MoE run) with
`ecdit_cli.fit`; `write_report(dir)` saves the figures and writes `report.md` and a
self-contained `report.html` (PNG figures inlined as base64, no external resources).
Where a fit is impossible (fewer than 3 sizes done, ...) the report says why instead of failing,
so it works on a study in progress.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecdit_cli import __version__
from ecdit_cli import collect as collect_mod
from ecdit_cli.collect import CollectResult, series_labels, series_order, size_labels
from ecdit_cli.errors import EcditError
from ecdit_cli.fit import (
    FitError,
    HoldoutResult,
    PowerLawFit,
    convergence_speedup,
    effective_params,
    fit_power_law,
    fit_table,
    holdout_largest,
)
from ecdit_cli.utils import atomic_write_text

FIT_X = {"params_active": "activated parameters", "train_flops": "training FLOPs"}
MIN_SIZES = 3  # a saturating power law has 3 parameters


@dataclass
class Analysis:
    """Every derived number of the report. Values that could not be computed hold a reason."""

    fits: dict[str, dict[str, PowerLawFit | str]]  # x column -> series -> fit or why not
    holdout: dict[str, dict[str, HoldoutResult | str]]
    effective: pd.DataFrame  # one row per done MoE run
    speedup: pd.DataFrame  # one row per MoE run with a dense run of the same size
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]
    data: CollectResult
    analysis: Analysis


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
                    holdout[x][s] = holdout_largest(xs, ys, n_boot=0, seed=seed, group=s)
                except FitError as err:
                    holdout[x][s] = str(err)
    notes: list[str] = []
    effective = _effective(runs, series, routing, fits["params_active"], notes)
    speedup = _speedups(data, series, routing)
    return Analysis(fits, holdout, effective, speedup, notes)


def _effective(runs, series, routing, fits, notes) -> pd.DataFrame:
    cols = ["run_id", "series", "params_active", "params_total", "final_val_loss", "dense_equiv_params",
            "multiplier_active", "multiplier_total", "reason"]  # fmt: skip
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
    rows = []
    for i, r in moe.iterrows():
        e = effective_params(dense[0], float(r["params_active"]), float(r["final_val_loss"]))
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
            reason = f"not reached before it failed at step {fmt_num(r['step'])}"
        elif reason and r["status"] != "done":
            reason = f"not reached yet ({r['status']} at step {fmt_num(r['step'])})"
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


# ---------------------------------------------------------------------------------------------
# Formatting: tables as (headers, rows) of strings, rendered to Markdown or HTML


def fmt_num(v: Any, digits: int = 4) -> str:
    """4 significant digits, scientific outside [1e-3, 1e6), an em dash for missing values."""
    if v is None or isinstance(v, str):
        return v or "—"
    v = float(v)
    if not math.isfinite(v):
        return "—"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _ci(fit: PowerLawFit, k: str) -> str:
    lo, hi = fit.ci.get(k, (math.nan, math.nan))
    return f"{fmt_num(getattr(fit, k))} [{fmt_num(lo)}, {fmt_num(hi)}]"


def _pct(v: Any) -> str:
    return "—" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.1f}%"


Table = tuple[list[str], list[list[str]]]


def _fit_table(fits: dict[str, PowerLawFit | str]) -> Table:
    head = ["series", "points", "E [95% CI]", "A [95% CI]", "α [95% CI]", "RMSE (log)", "R² (log)",
            "bootstrap refits", "notes"]  # fmt: skip
    rows = []
    for s, f in fits.items():
        if isinstance(f, str):
            rows.append([s, "—", "—", "—", "—", "—", "—", "—", f"no fit: {f}"])
        else:
            rows.append(
                [
                    s,
                    str(f.n),
                    _ci(f, "E"),
                    _ci(f, "A"),
                    _ci(f, "alpha"),
                    fmt_num(f.rmse_log, 3),
                    fmt_num(f.r2_log, 5),
                    f"{f.n_boot_ok}/{f.n_boot}",
                    "; ".join(f.warnings),
                ]
            )
    return head, rows


def _holdout_table(hold: dict[str, HoldoutResult | str], x: str) -> Table:
    head = ["series", f"held-out {FIT_X[x]}", "predicted loss", "actual loss", "relative error"]
    rows = []
    for s, h in hold.items():
        if isinstance(h, str):
            rows.append([s, "—", "—", "—", f"not possible: {h}"])
        else:
            rows.append(
                [s, fmt_num(h.x_held), fmt_num(h.predicted), fmt_num(h.actual), f"{100 * h.rel_error:+.2f}%"]
            )
    return head, rows


def _effective_table(eff: pd.DataFrame) -> Table:
    head = ["run", "series", "activated params", "total params", "final val loss", "dense-equivalent params",
            "× per activated param", "× per total param"]  # fmt: skip
    rows = [[r.run_id, r.series, fmt_num(r.params_active), fmt_num(r.params_total), fmt_num(r.final_val_loss),
             fmt_num(r.dense_equiv_params) if not r.reason else f"— ({r.reason})", fmt_num(r.multiplier_active, 3),
             fmt_num(r.multiplier_total, 3)] for r in eff.itertuples()]  # fmt: skip
    return head, rows


def _speedup_table(sp: pd.DataFrame) -> Table:
    head = ["run", "size", "dense run", "dense final val loss", "fraction of steps", "fraction of FLOPs",
            "speed-up (steps)", "notes"]  # fmt: skip
    rows = [[r.run_id, str(r.size), r.dense_run, fmt_num(r.target_loss), _pct(r.steps_fraction),
             _pct(r.flops_fraction), fmt_num(r.speedup_steps, 3) + ("×" if math.isfinite(r.speedup_steps) else ""),
             r.reason] for r in sp.itertuples()]  # fmt: skip
    return head, rows


def _runs_table(data: CollectResult) -> Table:
    runs = data.runs
    size, series = size_labels(runs, data.axes), series_labels(runs, data.axes)
    head = [
        "run",
        "size",
        "series",
        "status",
        "step / steps",
        "total params",
        "activated params",
        "training FLOPs",
        "final train loss",
        "final val loss",
        "GenEval overall",
        "wall time (s)",
    ]
    has_eval = "eval_overall" in runs
    rows = []
    for i, r in runs.iterrows():
        rows.append(
            [
                str(r["run_id"]),
                str(size[i]),
                series[i],
                r["status"],
                f"{fmt_num(r['step'])} / {fmt_num(r['steps'])}",
                fmt_num(r["params_total"]),
                fmt_num(r["params_active"]),
                fmt_num(r["train_flops"]),
                fmt_num(r["final_train_loss"]),
                fmt_num(r["final_val_loss"]),
                _pct(r["eval_overall"]) if has_eval else "—",
                fmt_num(r["wall_time_s"], 3),
            ]
        )
    return head, rows


def _md_table(t: Table) -> str:
    def cell(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head, rows = t
    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(t: Table) -> str:
    head, rows = t
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------------
# The document: a list of blocks rendered twice


def _study_name(root: Path) -> str:
    from ecdit_cli.config import load_yaml

    spec = root / "study.yaml"
    try:
        name = load_yaml(spec).get("name") if spec.is_file() else None
    except EcditError:
        name = None
    return str(name or root.resolve().name)


def _header(data: CollectResult) -> list[tuple[str, Any]]:
    runs = data.runs
    counts = runs["status"].value_counts()
    done, total = int(counts.get("done", 0)), len(runs)
    blocks: list[tuple[str, Any]] = [
        ("p", f"Directory: {data.study_dir}. Generated by ecdit {__version__} from runs.csv and curves.csv."),
        ("p", f"Runs done: {done} of {total} ("
              + ", ".join(f"{s} {int(n)}" for s, n in counts.items()) + ")."),
    ]  # fmt: skip
    items = []
    for _, r in runs[runs["status"].isin(["running", "interrupted"])].iterrows():
        items.append(f"{r['run_id']}: {r['status']} at step {fmt_num(r['step'])} of {fmt_num(r['steps'])}")
    for _, r in runs[runs["status"] == "pending"].iterrows():
        where = " (no run directory)" if r["run_id"] in data.missing else ""
        items.append(f"{r['run_id']}: pending, not started{where}")
    for _, r in runs[runs["status"] == "failed"].iterrows():
        items.append(
            f"{r['run_id']}: FAILED at step {fmt_num(r['step'])}: {r['error'] or 'no error recorded'}"
        )
    if items:
        blocks += [("p", "Not done (their rows are kept; fits use done runs only):"), ("ul", items)]
    else:
        blocks.append(("p", "Every run of the study is done."))
    if data.warnings:
        shown = data.warnings[:20]
        more = [f"... and {len(data.warnings) - 20} more"] if len(data.warnings) > 20 else []
        blocks += [("p", "Warnings while collecting:"), ("ul", shown + more)]
    return blocks


FIGURE_CAPTIONS = {
    "loss_vs_steps": "Training and validation loss vs optimizer steps, one panel per size.",
    "loss_vs_flops": "Training and validation loss vs cumulative training FLOPs, one panel per size.",
    "scaling_params": "Final validation loss vs activated parameters, with the fitted saturating power law "
                      "per routing and its bootstrap 95% band.",
    "scaling_flops": "Final validation loss vs training FLOPs, with the fitted saturating power law per routing "
                     "and its bootstrap 95% band.",
    "loss_vs_timestep": "Final validation loss at each fixed timestep t.",
    "routing_stats": "Routing statistics over training.",
    "eval_scores": "GenEval-style scores per routing and size.",
}  # fmt: skip


def _document(data: CollectResult, an: Analysis, figures: dict[str, Path]) -> list[tuple[str, Any]]:
    doc: list[tuple[str, Any]] = [("h1", f"Scaling study: {_study_name(data.study_dir)}")]
    doc += _header(data)
    doc.append(("h2", "Figures"))
    for stem, path in figures.items():
        doc += [("h3", FIGURE_CAPTIONS.get(stem, stem)), ("img", path)]
    doc.append(("h2", "Scaling fits: L = E + A·X^-α (final validation loss, done runs)"))
    doc.append(
        (
            "p",
            "Fitted per series with a Huber loss on log residuals, multi-start L-BFGS-B; CIs are "
            "bootstrap percentile intervals (resampling runs). A is in the units of X.",
        )
    )
    for x, label in FIT_X.items():
        doc += [("h3", f"Loss vs {label}"), ("table", _fit_table(an.fits[x]))]
    doc.append(("h2", "Held-out check: fit without the largest size, predict it"))
    for x, label in FIT_X.items():
        doc += [("h3", f"Loss vs {label}"), ("table", _holdout_table(an.holdout[x], x))]
    doc.append(("h2", "MoE vs dense"))
    doc.append(("h3", "Effective-parameter multiplier (dense parameters with the same fitted loss)"))
    if not an.effective.empty:
        doc.append(("table", _effective_table(an.effective)))
    else:
        doc.append(("p", " ".join(an.notes) or "No done MoE runs yet."))
    doc.append(("h3", "Convergence speed-up vs the dense run of the same size"))
    doc.append(
        (
            "p",
            "Share of the dense run's steps and FLOPs the MoE run needed to reach the dense run's "
            "final validation loss (linear interpolation between validation records).",
        )
    )
    if not an.speedup.empty:
        doc.append(("table", _speedup_table(an.speedup)))
    else:
        doc.append(("p", "No MoE run has a done dense run of the same size yet."))
    doc += [
        ("h2", "Per-run final numbers"),
        ("p", "For runs that are not done, the loss columns hold the latest logged values."),
        ("table", _runs_table(data)),
    ]
    return doc


def render_markdown(doc: list[tuple[str, Any]], root: Path) -> str:
    out = []
    for kind, body in doc:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body)
        elif kind == "p":
            out.append(body)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in body))
        elif kind == "img":
            out.append(f"![{body.stem}]({body.relative_to(root).as_posix()})")
        elif kind == "table":
            out.append(_md_table(body))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
li { margin: .15em 0; }
"""


def render_html(doc: list[tuple[str, Any]], title: str) -> str:
    out = []
    for kind, body in doc:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(body)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(body)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in body) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(body.read_bytes()).decode()
            out.append(f'<img alt="{html.escape(body.stem)}" src="data:image/png;base64,{data}">')
        elif kind == "table":
            out.append(_html_table(body))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def write_report(
    path: str | Path,
    *,
    recollect: bool | None = None,
    n_boot: int = 200,
    seed: int = 0,
    data: CollectResult | None = None,
) -> ReportFiles:
    """Collect (when stale, or as `recollect` says), fit, save every figure as PNG and SVG into
    plots/, and write report.md and report.html into the study directory."""
    import matplotlib.pyplot as plt

    from ecdit_cli.plot import make_figures, save_figure

    data = data or collect_mod.load(path, recollect)
    root = data.study_dir
    an = analyse(data, n_boot=n_boot, seed=seed)
    figs = make_figures(data, an.fits)
    pngs: dict[str, Path] = {}
    written: list[Path] = []
    for stem, fig in figs.items():
        saved = save_figure(fig, root / "plots", stem)
        plt.close(fig)
        pngs[stem] = saved["png"]
        written += [saved["png"], saved["svg"]]
    doc = _document(data, an, pngs)
    md, page = root / "report.md", root / "report.html"
    atomic_write_text(md, render_markdown(doc, root))
    atomic_write_text(page, render_html(doc, f"ecdit report: {_study_name(root)}"))
    return ReportFiles(md, page, written, data, an)
