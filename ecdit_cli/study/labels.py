"""Labels of a study's runs, shared by the findings, the figures and the report.

A run's *size* is the value of its size axis (a preset name, or a width); its *series* is its
routing plus every other axis that varies within that routing (`expert_choice E=16`), except
sizes and replicates (seeds), which never split a series.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pandas as pd
import yaml

from ecdit_cli.config import VARIANT_DEFAULTS
from ecdit_cli.numbers import plain

# Axes that name a model size, and axes that are replicates: neither splits a series.
SIZE_AXES = ("size", "hidden_size", "depth", "model.hidden_size", "model.depth", "preset")
REPLICATE_AXES = ("seed", "train.seed")
AXIS_ABBREV = {"num_experts": "E", "capacity_factor": "f", "top_k": "k", "moe.num_experts": "E",
               "routing_group": "group", "moe.routing_group": "group"}
# Routing-variant axes (named or dotted) -> label name, default value. Such an axis splits a
# series only where its value differs from the default, and a run at the default (or without a
# value: a point that did not set it) carries no part for it, so the baseline keeps its label.
VARIANT_NAMES = {"shared_experts": "shared", "shared_expert_width_mult": "shared width",
                 "expert_width_mult": "width", "router_input": "router", "route_scale": "scale",
                 "renormalize_gates": "renorm", "capacity_schedule": "f per layer", "routing_debug": "debug"}
VARIANT_LABELS: dict[str, tuple[str, Any]] = {
    axis: (name, VARIANT_DEFAULTS[key]) for key, name in VARIANT_NAMES.items() for axis in (key, f"moe.{key}")
}
# Batch-level groups read the same way: per-image routing (the default, or a point that did not set
# the axis) keeps the routing's plain label, `group=batch` marks the others.
VARIANT_LABELS.update({"routing_group": ("group", "image"), "moe.routing_group": ("group", "image")})


def size_labels(runs: pd.DataFrame, axes: list[str]) -> pd.Series:
    """Each run's model-size name: the `size` axis, else the width, else one shared label."""
    for a in ("size", "hidden_size", "model.hidden_size", "preset"):
        if a in axes and a in runs:
            return runs[a].map(lambda v: "?" if blank(v) else plain(v))
    return pd.Series(["all"] * len(runs), index=runs.index)


def size_order(runs: pd.DataFrame, sizes: pd.Series) -> list[str]:
    """Size names from small to large by total parameters, compared within the routings two
    sizes share (an MoE size is larger in total than the next dense size)."""
    routing = runs["routing"].astype(str) if "routing" in runs else pd.Series("run", index=runs.index)
    table = runs["params_total"].groupby([sizes, routing]).median().unstack()

    def cmp(a: str, b: str) -> int:
        ra, rb = table.loc[a], table.loc[b]
        shared = ra.notna() & rb.notna()
        x, y = (ra[shared].median(), rb[shared].median()) if shared.any() else (ra.min(), rb.min())
        if math.isnan(x) or math.isnan(y):
            return (math.isnan(x) - math.isnan(y)) or (-1 if str(a) < str(b) else 1)
        return -1 if x < y else 1 if x > y else (-1 if str(a) < str(b) else 1)

    return sorted(table.index, key=functools.cmp_to_key(cmp))


def series_labels(runs: pd.DataFrame, axes: list[str]) -> pd.Series:
    """A label per run naming its curve family: the routing, plus any axis that varies within
    that routing other than size and seed (e.g. 'expert_choice E=16')."""
    routing = (
        runs["routing"].astype(str) if "routing" in runs else pd.Series(["run"] * len(runs), index=runs.index)
    )
    other = [a for a in axes if a != "routing" and a not in SIZE_AXES and a not in REPLICATE_AXES]
    labels = routing.copy()
    for r, idx in routing.groupby(routing).groups.items():
        sub = runs.loc[idx]
        varying = [a for a in other if sub[a].map(lambda v, a=a: _label_value(a, v)).nunique(dropna=True) > 1]
        for i in idx:
            parts = []
            for a in varying:
                v = _label_value(a, runs.at[i, a])
                if a in VARIANT_LABELS:
                    if v != _label_value(a, None):
                        parts.append(f"{VARIANT_LABELS[a][0]}={v}")
                else:
                    parts.append(f"{AXIS_ABBREV.get(a, a)}={v}")
            labels.at[i] = " ".join([str(r), *parts])
    return labels


def _label_value(axis: str, value: Any) -> str:
    """A run's value of an axis as a label; a routing-variant axis left blank reads as its default."""
    if axis not in VARIANT_LABELS:
        return plain(value)
    default = VARIANT_LABELS[axis][1]
    if blank(value):
        value = default
    if isinstance(value, str) and not isinstance(default, str):
        value = yaml.safe_load(value)  # a list, number or boolean read back from a CSV cell
    if isinstance(value, list):
        return "[" + ", ".join(plain(float(v)) for v in value) + "]"
    if isinstance(default, bool):
        return str(bool(value)).lower()
    if isinstance(value, (int, float)):
        return plain(float(value))
    return plain(value)


ROUTING_ORDER = ("dense", "token_choice", "expert_choice", "race")


def series_order(runs: pd.DataFrame, series: pd.Series) -> list[str]:
    """Series labels: dense, token choice, expert choice, race, then others; by name within."""
    routing = runs["routing"].astype(str) if "routing" in runs else pd.Series("run", index=runs.index)
    first = {s: routing[series == s].iloc[0] for s in series.unique()}
    rank = {r: i for i, r in enumerate(ROUTING_ORDER)}
    return sorted(first, key=lambda s: (rank.get(first[s], len(rank)), str(s)))


def blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""
