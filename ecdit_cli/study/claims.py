"""The paper's claims next to what a study measured: the "Findings" of a study report.

Each claim of EC-DiT (docs/paper.md, "Reported results") that a study of dense, token-choice and
expert-choice runs can test becomes one `Finding` with the study's numbers and a verdict:
reproduced, partly reproduced, not reproduced, or not testable (with the reason). The rules are
fixed in advance and stated in the report:
- a gap between two series at one size is *resolved* when its mean is further from zero than
  twice its standard error (per-seed spread where the size has seeds, else the spread the study
  measured for the same comparison at the sizes that do: `gaps.noise_sd`);
- "beats" is reproduced when the expert-choice series is resolved lower at most sizes and higher
  at none, partly when it is lower at some and higher at none, not reproduced otherwise;
- "grows with scale" needs the slope of the gap against log10(activated parameters) to be
  negative by more than twice its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ecdit_cli.study import gaps
from ecdit_cli.study.allocation import pooled

VERDICT_RULES = (
    "Claims as docs/paper.md records them (its 'Reported results'; the notes do not keep the paper's "
    "figure and table numbers, so each claim is named by what it says). Verdicts follow fixed rules: a gap at one size is resolved when its mean is further from zero than "
    "twice its standard error (the per-seed spread at sizes with seeds; elsewhere the spread the study "
    "measured for the same comparison at the sizes that have seeds). 'Beats' is reproduced when expert "
    "choice is resolved lower at most sizes and higher at none, partly when lower at some and higher at "
    "none, not reproduced otherwise; 'about equals' is reproduced when expert choice is resolved higher at "
    "no size; 'grows with scale' needs the slope of the gap against log10(activated parameters) to be negative by more than "
    "twice its standard error."
)
REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "partly reproduced", "not reproduced", "not testable"


@dataclass
class Finding:
    claim: str  # what the paper reports
    measured: str  # what this study measured, with numbers
    verdict: str


def _pct(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{100 * v:+.1f}%"


def _median(g: pd.DataFrame, col: str) -> float:
    if col not in g:
        return math.nan
    v = pd.to_numeric(g[col], errors="coerce").dropna()
    return float(v.median()) if len(v) else math.nan


def _series(done: pd.DataFrame) -> pd.DataFrame:
    """Per series: routing, experts, capacity factor, number of sizes."""
    rows = []
    for s, g in done.groupby("series", sort=False):
        rows.append([s, str(g["routing"].iloc[0]), _median(g, "num_experts"), _median(g, "capacity_factor"),
                     g["size"].nunique()])
    return pd.DataFrame(rows, columns=["series", "routing", "num_experts", "capacity_factor", "sizes"])


def _pick(info: pd.DataFrame, routing: str, **match: float) -> str | None:
    """The series of `routing` (with the given experts / capacity) present at the most sizes."""
    c = info[info["routing"] == routing]
    for k, v in match.items():
        c = c[c[k] == v]
    if c.empty:
        return None
    return str(c.sort_values("sizes", ascending=False, kind="stable")["series"].iloc[0])


def _per_size(g: pd.DataFrame) -> tuple[str, list[gaps.Verdict]]:
    pooled_sd = gaps.noise_sd(g)
    vs = [gaps.verdict(r.gap_mean, r.gap_sd, int(r.n), pooled_sd) for r in g.itertuples()]
    parts = []
    for r, v in zip(g.itertuples(), vs, strict=True):
        spread = f" ± {100 * r.gap_sd:.1f}%" if r.n > 1 and math.isfinite(r.gap_sd) else ""
        parts.append(f"{r.size} {_pct(r.gap_mean)}{spread} (n={r.n}, {v.text})")
    return "; ".join(parts), vs


def _beats(vs: list[gaps.Verdict]) -> str:
    lower, higher = sum(v.sign < 0 for v in vs), sum(v.sign > 0 for v in vs)
    if higher:
        return NOT_REPRODUCED
    return REPRODUCED if lower > len(vs) / 2 else PARTLY if lower else NOT_REPRODUCED


def _comparison(runs, axes, a: str | None, b: str | None, claim: str, what: str, rule=_beats) -> Finding:
    if a is None or b is None:
        return Finding(claim, f"the study has no {what} series to compare", NOT_TESTABLE)
    g = gaps.paired_gaps(runs, axes, a, b)
    if g.empty:
        return Finding(claim, f"{a} and {b} share no size", NOT_TESTABLE)
    text, vs = _per_size(g)
    return Finding(claim, f"final val loss of {a} vs {b}: {text}", rule(vs))


def _no_worse(vs: list[gaps.Verdict]) -> str:
    higher = sum(v.sign > 0 for v in vs)
    return REPRODUCED if higher == 0 else (PARTLY if higher < len(vs) else NOT_REPRODUCED)


def findings(runs: pd.DataFrame, axes: list[str], speedup: pd.DataFrame,
             allocation_layers: pd.DataFrame) -> list[Finding]:  # fmt: skip
    done = gaps.labelled_done(runs, axes)
    if done.empty or "routing" not in done:
        return []
    info = _series(done)
    dense = _pick(info, "dense")
    ec = _pick(info, "expert_choice")
    e = float(info.loc[info["series"] == ec, "num_experts"].iloc[0]) if ec else math.nan
    tc_same = _pick(info, "token_choice", num_experts=e) if ec else None
    tc_double = _pick(info, "token_choice", num_experts=2 * e) if ec else None
    out = [
        _comparison(runs, axes, ec, dense, "Expert choice converges faster than dense at similar activated "
                    "parameters (training loss curves)", "expert-choice or dense"),
        _comparison(runs, axes, ec, tc_same, "Expert choice beats token choice with the same experts at "
                    "similar activated parameters", "expert-choice or same-E token-choice"),
        _comparison(runs, axes, ec, tc_double, "EC with 8 experts about equals token choice with 16 "
                    "(judged here: expert choice no worse than token choice with twice the experts)",
                    "expert-choice or 2E token-choice", rule=_no_worse),
        _growth(runs, axes, ec, dense, speedup),
        *_allocation(allocation_layers, runs),
        _geneval(done),
    ]
    return out


def _growth(runs, axes, ec, dense, speedup: pd.DataFrame) -> Finding:
    claim = ("The advantage grows with scale: EC-DiT-XXL at 200K steps about equals dense XXL at 400K "
             "(2x fewer steps at the largest size)")
    if ec is None or dense is None:
        return Finding(claim, "no expert-choice or dense series", NOT_TESTABLE)
    g = gaps.paired_gaps(runs, axes, ec, dense)
    fit = gaps.trend(g)
    if fit is None:
        return Finding(claim, f"{len(g)} shared size(s); a trend needs at least 3", NOT_TESTABLE)
    slope, se, n = fit
    sp = speedup[(speedup["series"] == ec)] if not speedup.empty else speedup
    parts = [f"slope of the EC-vs-dense gap: {100 * slope:+.2f}% ± {100 * se:.2f}% per 10x activated "
             f"parameters over {n} sizes"]
    if not sp.empty:
        sp = sp.assign(size=sp["size"].astype(str))
        for size in (str(g["size"].iloc[0]), str(g["size"].iloc[-1])):
            cell = sp[sp["size"] == size]
            vals = cell["speedup_steps"].dropna()
            reached = f"{len(vals)}/{len(cell)} reached the dense final loss"
            mean = f"{vals.mean():.2f}x" if len(vals) else "—"
            parts.append(f"steps speed-up at {size}: {mean} ({reached})")
    verdict = REPRODUCED if slope < -2 * se else NOT_REPRODUCED
    return Finding(claim, "; ".join(parts), verdict)


def _allocation(layers: pd.DataFrame, runs: pd.DataFrame) -> list[Finding]:
    claim_obj = "Detailed patches get more experts (up to 44% of the experts pick one patch)"
    claim_depth = "Allocation is more uniform in early layers, more concentrated in later layers"
    if layers.empty:
        why = "no `ecdit analyze` result of an expert-choice run in the study's analyze/ folder"
        return [Finding(claim_obj, why, NOT_TESTABLE), Finding(claim_depth, why, NOT_TESTABLE)]
    table = pooled(layers, runs)
    big = layers.merge(runs[["run_id", "params_active"]], on="run_id", how="left")
    largest = big.sort_values("params_active", kind="stable")["run_id"].iloc[-1]
    group = table[table["runs"].str.split(", ").map(lambda rs: largest in rs)]
    name, n = str(group["group"].iloc[0]), int(group["n"].iloc[0])
    seeds = f"{n} seeds" if n > 1 else "1 seed (no seeds at this size, so no noise estimate)"

    def resolved(diff: float, sd: float) -> int:
        """The sign of `diff` when it exceeds twice its standard error over seeds (with one seed:
        its plain sign, as the measurement says nothing about the noise)."""
        if n > 1 and math.isfinite(sd):
            return 0 if abs(diff) <= 2 * sd / math.sqrt(n) else (1 if diff > 0 else -1)
        return (diff > 0) - (diff < 0)

    signs = [resolved(r.ratio_mean - 1, r.ratio_sd) for r in group.itertuples()]
    ratios = ", ".join(f"block {r.block} {r.ratio_mean:.2f}x" + (f" ± {r.ratio_sd:.2f}" if n > 1 else "")
                       for r in group.itertuples())  # fmt: skip
    above, below = signs.count(1), signs.count(-1)
    verdict = REPRODUCED if above == len(group) else PARTLY if above else NOT_REPRODUCED
    obj = Finding(claim_obj, f"{name} ({seeds}): experts per object token / per background token on "
                  f"rendered scenes: {ratios}; resolved above 1 in {above}, below 1 in {below} of "
                  f"{len(group)} MoE layers", verdict)
    if len(group) < 2:
        depth = Finding(claim_depth, f"{name} has one MoE layer", NOT_TESTABLE)
    else:
        first, last = group.iloc[0], group.iloc[-1]
        cvs = ", ".join(f"block {r.block} {r.cv_mean:.2f}" + (f" ± {r.cv_sd:.2f}" if n > 1 else "")
                        for r in group.itertuples())  # fmt: skip
        sd = math.hypot(first["cv_sd"], last["cv_sd"]) if n > 1 else math.nan
        sign = resolved(last["cv_mean"] - first["cv_mean"], sd)
        verdict = REPRODUCED if sign > 0 else NOT_REPRODUCED
        tail = "" if sign else " (first and last layer within the seed spread)"
        depth = Finding(claim_depth, f"{name} ({seeds}): coefficient of variation of experts per token: "
                        f"{cvs}{tail}", verdict)
    return [obj, depth]


def _geneval(done: pd.DataFrame) -> Finding:
    claim = "GenEval overall 71.68% (EC-DiT-M, 97B parameters, 256 px)"
    if "eval_overall" not in done or done["eval_overall"].isna().all():
        return Finding(claim, "no run was scored", NOT_TESTABLE)
    best = done.loc[done["eval_overall"].astype(float).idxmax()]
    return Finding(claim, f"best run of this study: {best['run_id']} at {100 * float(best['eval_overall']):.1f}% "
                   "on the built-in scenes (a different prompt set and scale)", NOT_TESTABLE)
