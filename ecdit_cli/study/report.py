"""The study report: fits, held-out checks and MoE-vs-dense views, written as Markdown and HTML.

`analyse(data)` computes every number (per-series saturating power laws of the final
validation loss in activated parameters and in training FLOPs, the held-out check, the
effective-parameter multiplier and the convergence speed-up of each MoE run) with
`ecdit_cli.study.fit`; `write_report(dir)` saves the figures and writes `report.md` and a
self-contained `report.html` (PNG figures inlined as base64, no external resources).
Where a fit is impossible (fewer than 3 sizes done, ...) the report says why instead of failing,
so it works on a study in progress.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ecdit_cli import __version__, rundir
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_text
from ecdit_cli.numbers import sig
from ecdit_cli.study import collect as collect_mod
from ecdit_cli.study.allocation import ANALYZE_DIR, pooled
from ecdit_cli.study.claims import VERDICT_RULES
from ecdit_cli.study.collect import CollectResult
from ecdit_cli.study.findings import FIT_X, Analysis, ChinchillaResult, analyse
from ecdit_cli.study.fit import HoldoutResult, PowerLawFit
from ecdit_cli.study.gaps import sample_sd
from ecdit_cli.study.labels import series_labels, size_labels


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]
    data: CollectResult
    analysis: Analysis


# ---------------------------------------------------------------------------------------------
# Formatting: tables as (headers, rows) of strings, rendered to Markdown or HTML


def _ci(fit: PowerLawFit, k: str) -> str:
    lo, hi = fit.ci.get(k, (math.nan, math.nan))
    return f"{sig(getattr(fit, k))} [{sig(lo)}, {sig(hi)}]"


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
                    sig(f.rmse_log, 3),
                    sig(f.r2_log, 5),
                    f"{f.n_boot_ok}/{f.n_boot}",
                    "; ".join(f.warnings),
                ]
            )
    return head, rows


def _holdout_table(hold: dict[str, HoldoutResult | str], x: str) -> Table:
    head = ["series", f"held-out {FIT_X[x]}", "predicted loss", "actual loss", "relative error",
            "95% band (relative)"]  # fmt: skip
    rows = []
    for s, h in hold.items():
        if isinstance(h, str):
            rows.append([s, "—", "—", "—", f"not possible: {h}", "—"])
        else:
            lo, hi = h.rel_error_ci
            band = f"[{100 * lo:+.1f}%, {100 * hi:+.1f}%]" if math.isfinite(lo) else "—"
            rows.append(
                [s, sig(h.x_held), sig(h.predicted), sig(h.actual), f"{100 * h.rel_error:+.2f}%", band]
            )
    return head, rows


def _spread(mean: float, sd: float, n: int, pct: bool = False) -> str:
    """'mean ± sd' over seeds ('mean' alone for one seed)."""
    if not math.isfinite(mean):
        return "—"
    fmt = (lambda v: f"{100 * v:+.1f}%") if pct else sig
    if n > 1 and math.isfinite(sd):
        return f"{fmt(mean)} ± {100 * sd:.1f}%" if pct else f"{fmt(mean)} ± {sig(sd, 2)}"
    return fmt(mean)


def _gap_lookup(g: pd.DataFrame) -> dict[tuple[str, str], Any]:
    return {(str(r.size), str(r.series)): r for r in g.itertuples()}


def _cells_table(an: Analysis) -> Table:
    head = ["size", "series", "seeds", "activated params", "final val loss (mean ± sd)", "range",
            "vs dense (paired by seed)", "GenEval overall", "FD-scenes"]  # fmt: skip
    gap = _gap_lookup(an.vs_dense)
    rows = []
    for c in an.cells.itertuples():
        g = gap.get((str(c.size), str(c.series)))
        rng = f"{sig(c.loss_min)}–{sig(c.loss_max)}" if c.n > 1 else "—"
        rows.append([str(c.size), c.series, str(c.n), sig(c.params_active, 3), _spread(c.loss_mean, c.loss_sd, c.n),
                     rng, _spread(g.gap_mean, g.gap_sd, g.n, pct=True) if g is not None else "—",
                     _pct(c.geneval_mean), sig(c.fd_mean, 4)])  # fmt: skip
    return head, rows


def _pairs_table(pairs: pd.DataFrame) -> Table:
    head = ["size", "expert choice", "token choice", "seed pairs", "EC loss vs TC (mean ± sd)"]
    rows = [[str(r.size), r.series, r.reference, str(r.n) if r.paired else f"{r.n} (unpaired means)",
             _spread(r.gap_mean, r.gap_sd, r.n, pct=True)] for r in pairs.itertuples()]  # fmt: skip
    return head, rows


def _variants_table(an: Analysis) -> Table | None:
    """Series of one routing at the sizes where it has several (capacity factors, expert counts)."""
    cells, gap = an.cells, _gap_lookup(an.vs_dense)
    if cells.empty:
        return None
    per = cells.groupby(["routing", "size"], sort=False)["series"].transform("nunique")
    shared = cells[per > 1]
    if shared.empty:
        return None
    head = ["size", "series", "seeds", "activated params", "training FLOPs", "final val loss", "vs dense",
            "GenEval overall"]  # fmt: skip
    rows = []
    for c in shared.sort_values(["routing"], kind="stable").itertuples():
        g = gap.get((str(c.size), str(c.series)))
        rows.append([str(c.size), c.series, str(c.n), sig(c.params_active, 3), sig(c.train_flops, 3),
                     _spread(c.loss_mean, c.loss_sd, c.n), _spread(g.gap_mean, g.gap_sd, g.n, pct=True)
                     if g is not None else "—", _pct(c.geneval_mean)])  # fmt: skip
    return head, rows


def _gains_by_size(data: CollectResult, an: Analysis) -> Table:
    """The per-run multiplier and speed-up, as mean ± sd over the seeds of each (size, series)."""
    size = dict(zip(data.runs["run_id"].astype(str), size_labels(data.runs, data.axes).astype(str), strict=True))
    eff = an.effective.assign(size=an.effective["run_id"].astype(str).map(size))
    head = ["size", "series", "runs", "× per activated param (mean ± sd)", "speed-up in steps (mean ± sd)",
            "reached the dense loss"]  # fmt: skip
    rows = []
    for c in an.cells[an.cells["routing"] != "dense"].itertuples():
        m = eff[(eff["size"] == str(c.size)) & (eff["series"] == c.series)]
        m = pd.to_numeric(m["multiplier_active"], errors="coerce").dropna()
        sp = an.speedup[(an.speedup["size"].astype(str) == str(c.size)) & (an.speedup["series"] == c.series)] \
            if not an.speedup.empty else an.speedup
        v = sp["speedup_steps"].dropna() if not sp.empty else pd.Series(dtype=float)
        mult = _spread(float(m.mean()), sample_sd(m), len(m)) if len(m) else "—"
        spd = _spread(float(v.mean()), sample_sd(v), len(v)) if len(v) else "—"
        rows.append([str(c.size), c.series, str(c.n), mult, spd, f"{len(v)}/{len(sp)}"])
    return head, rows


def _allocation_table(pooled: pd.DataFrame) -> Table:
    head = ["run (seeds pooled)", "MoE block", "seeds", "experts per object token", "per background token",
            "object / background (mean ± sd)", "CV of experts per token (mean ± sd)"]  # fmt: skip
    rows = [[r.group, str(r.block), str(r.n), sig(r.object_mean, 3), sig(r.background_mean, 3),
             f"{r.ratio_mean:.2f}" + (f" ± {r.ratio_sd:.2f}" if r.n > 1 else ""),
             f"{r.cv_mean:.2f}" + (f" ± {r.cv_sd:.2f}" if r.n > 1 else "")] for r in pooled.itertuples()]  # fmt: skip
    return head, rows


def _effective_table(eff: pd.DataFrame) -> Table:
    head = ["run", "series", "activated params", "total params", "final val loss", "dense-equivalent params",
            "× per activated param", "× per total param", "notes"]  # fmt: skip
    rows = [[r.run_id, r.series, sig(r.params_active), sig(r.params_total), sig(r.final_val_loss),
             sig(r.dense_equiv_params) if not r.reason else f"— ({r.reason})", sig(r.multiplier_active, 3),
             sig(r.multiplier_total, 3), r.note] for r in eff.itertuples()]  # fmt: skip
    return head, rows


def _speedup_table(sp: pd.DataFrame) -> Table:
    head = ["run", "size", "dense run", "dense final val loss", "fraction of steps", "fraction of FLOPs",
            "speed-up (steps)", "notes"]  # fmt: skip
    rows = [[r.run_id, str(r.size), r.dense_run, sig(r.target_loss), _pct(r.steps_fraction),
             _pct(r.flops_fraction), sig(r.speedup_steps, 3) + ("×" if math.isfinite(r.speedup_steps) else ""),
             r.reason] for r in sp.itertuples()]  # fmt: skip
    return head, rows


def _chinchilla_tables(ch: dict[str, ChinchillaResult | str]) -> tuple[Table, Table]:
    fit_rows, opt_rows = [], []
    for routing, res in ch.items():
        if isinstance(res, str):
            fit_rows.append([routing] + ["-"] * 6 + [res])
            continue
        f = res.fit
        fit_rows.append([routing, sig(f.E), sig(f.A), _ci(f, "alpha"), sig(f.B), _ci(f, "beta"),
                         str(res.n_points), "; ".join(f.warnings) or f"rmse(log) {sig(f.rmse_log, 3)}"])
        o = res.optimal
        for c, n, d, loss in zip(o.C, o.N_opt, o.D_opt, o.loss_opt, strict=False):
            opt_rows.append([routing, sig(c, 3), sig(n, 3), sig(d, 3), sig(loss),
                             f"{o.a:.2f} / {o.b:.2f}"])
    fits = (["series", "E", "A", "alpha [95% CI]", "B", "beta [95% CI]", "points", "quality / notes"], fit_rows)
    opts = (["series", "budget C (FLOPs)", "N_opt (activated params)", "D_opt (images)", "fitted loss",
             "N ~ C^a / D ~ C^b"], opt_rows)
    return fits, opts


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
        "FD-scenes",
        "wall time (s)",
    ]
    has_eval = "eval_overall" in runs
    has_fd = "eval_fd_scenes" in runs
    rows = []
    for i, r in runs.iterrows():
        rows.append(
            [
                str(r["run_id"]),
                str(size[i]),
                series[i],
                r["status"],
                f"{sig(r['step'])} / {sig(r['steps'])}",
                sig(r["params_total"]),
                sig(r["params_active"]),
                sig(r["train_flops"]),
                sig(r["final_train_loss"]),
                sig(r["final_val_loss"]),
                _pct(r["eval_overall"]) if has_eval else "—",
                sig(r["eval_fd_scenes"], 4) if has_fd else "—",
                sig(r["wall_time_s"], 3),
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
        items.append(f"{r['run_id']}: {r['status']} at step {sig(r['step'])} of {sig(r['steps'])}")
    for _, r in runs[runs["status"] == "pending"].iterrows():
        where = " (no run directory)" if r["run_id"] in data.missing else ""
        items.append(f"{r['run_id']}: pending, not started{where}")
    for _, r in runs[runs["status"] == "failed"].iterrows():
        items.append(
            f"{r['run_id']}: FAILED at step {sig(r['step'])}: {r['error'] or 'no error recorded'}"
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
    "race_stats": "Race routing over training: experts per token, learned threshold, unrouted tokens, slot use.",
    "eval_scores": "GenEval-style scores per routing and size.",
}  # fmt: skip


def _document(data: CollectResult, an: Analysis, figures: dict[str, Path]) -> list[tuple[str, Any]]:
    doc: list[tuple[str, Any]] = [("h1", f"Scaling study: {_study_name(data.study_dir)}")]
    doc += _header(data)
    if an.claims:
        doc += [
            ("h2", "Findings: the paper's claims against this study"),
            ("p", VERDICT_RULES),
            ("table", (["paper's claim", "this study", "verdict"],
                       [[f.claim, f.measured, f.verdict] for f in an.claims])),
        ]
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
    doc += _gap_sections(data, an)
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
    if an.chinchilla:
        fits, opts = _chinchilla_tables(an.chinchilla)
        doc += [
            ("h2", "Size and budget together: L(N, D) = E + A/N^alpha + B/D^beta"),
            ("p", "Fitted per series on every validation record past 20% of its run (N = activated "
                  "parameters, D = training images seen), Huber loss in log space (Hoffmann et al. 2022, "
                  "approach 3). Points along one run share its learning-rate schedule, so with a decaying "
                  "schedule intermediate points overstate the loss; budgets C are training FLOPs "
                  "(C = k N D, k from the runs' own accounting)."),
            ("table", fits),
            ("h3", "Compute-optimal allocation implied by the fit"),
            ("table", opts) if opts[1] else ("p", "No series has a fit with alpha, beta > 0."),
        ]
    doc += _tracking_section(data)
    doc += [
        ("h2", "Per-run final numbers"),
        ("p", "For runs that are not done, the loss columns hold the latest logged values."),
        ("table", _runs_table(data)),
    ]
    return doc


def _tracking_section(data: CollectResult) -> list[tuple[str, Any]]:
    """Links to the runs' TensorBoard log directories (`train.tracker` with tensorboard), where they exist."""
    from ecdit_cli.train.trackers import TB_DIR

    root = data.study_dir
    logs = [(str(rid), root / rundir.RUNS / str(rid) / TB_DIR) for rid in data.runs["run_id"]]
    logs = [(rid, d) for rid, d in logs if d.is_dir()]
    if not logs:
        return []
    return [("h2", "Live tracking"),
            ("p", f"TensorBoard logs of {len(logs)} run(s); all of them side by side: "
                  f"tensorboard --logdir {root / rundir.RUNS}"),
            ("links", logs)]


def _gap_sections(data: CollectResult, an: Analysis) -> list[tuple[str, Any]]:
    if an.cells.empty:
        return []
    doc: list[tuple[str, Any]] = [
        ("h2", "The routing gap per size, over seeds"),
        ("p", "Final validation loss per size and series: mean ± sample standard deviation over the seeds "
              "that ran (one number where one seed ran). 'vs dense' is the relative gap (L - L_dense) / "
              "L_dense, paired by seed; negative means a lower loss than dense at the same activated FLOPs."),
        ("table", _cells_table(an)),
    ]
    if not an.head_to_head.empty:
        doc += [("h3", "Expert choice against token choice at each size"), ("table", _pairs_table(an.head_to_head))]
    variants = _variants_table(an)
    if variants is not None:
        doc += [("h3", "Variants of one routing at the sizes they share (capacity factor, experts)"),
                ("p", "Activated parameters and FLOPs grow with the capacity factor f: each extra unit of f "
                      "is one more expert FFN per token on average."),
                ("table", variants)]
    if not an.effective.empty or not an.speedup.empty:
        doc += [("h3", "Effective-parameter multiplier and speed-up per size"), ("table", _gains_by_size(data, an))]
    if not an.allocation.empty:
        root = data.study_dir
        doc += [
            ("h2", "Compute allocation of expert choice"),
            ("p", f"From `ecdit analyze` results in {ANALYZE_DIR}/: experts per token on rendered scenes with "
                  "known object masks, averaged over t in {0.1, 0.3, 0.5, 0.7, 0.9}; a ratio above 1 means "
                  "object tokens get more experts than background tokens. Each expert-choice token gets "
                  "f experts on average by construction, so only the split between tokens can move."),
            ("table", _allocation_table(pooled(an.allocation, data.runs))),
        ]
        # The figures of the largest analysed run only: the table covers the others.
        size = data.runs.set_index(data.runs["run_id"].astype(str))["params_active"]
        rid = max(an.allocation["run_id"].astype(str).unique(), key=lambda r: float(size.get(r, 0.0)))
        for stem in ("object_vs_background", "heatmaps"):
            png = root / ANALYZE_DIR / rid / f"{stem}.png"
            if png.is_file():
                doc += [("h3", f"{rid}: {stem.replace('_', ' ')}"), ("img", png)]
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
        elif kind == "links":
            out.append("\n".join(f"- [{label}]({path.relative_to(root).as_posix()}/)" for label, path in body))
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


def render_html(doc: list[tuple[str, Any]], title: str, root: Path | None = None) -> str:
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
        elif kind == "links":  # relative to the page, which lies in the study directory
            out.append("<ul>" + "".join(
                f'<li><a href="{html.escape(path.relative_to(root).as_posix() if root else path.as_posix())}/">'
                f"{html.escape(label)}</a></li>" for label, path in body) + "</ul>")
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

    from ecdit_cli.figures import save_figure
    from ecdit_cli.study.figures import make_figures

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
    atomic_write_text(page, render_html(doc, f"ecdit report: {_study_name(root)}", root))
    return ReportFiles(md, page, written, data, an)
