"""The house style of a study's figures: one colour per routing, shades and markers per size.

`_Layout` labels a study's runs (size, series, colour, line style, marker) so every figure in
`study.figures` draws the same run the same way; `grid` and `finish` lay out a multi-panel
figure with its title, note and legend.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ecdit_cli import figures  # noqa: F401, I001  (first: the Agg backend and the house style)
from ecdit_cli.numbers import si
from ecdit_cli.study.collect import CollectResult
from ecdit_cli.study.labels import series_labels, series_order, size_labels, size_order

ROUTING_COLORS = {"dense": "#3a3a3a", "token_choice": "#1f6fb4", "expert_choice": "#e0541b", "race": "#7b3fa0"}
ROUTING_NAMES = {"dense": "Dense", "token_choice": "Token choice (TC)", "expert_choice": "Expert choice (EC)",
                 "race": "Race (top-k over tokens x experts)"}
_OTHER_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
SIZE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
SERIES_STYLES = ["-", "--", ":", "-."]
LOSS_LABEL = "validation loss (MSE of velocity)"
X_LABELS = {
    "step": "optimizer steps",
    "flops": "training FLOPs (cumulative)",
    "images_seen": "images seen",
    "params_active": "activated parameters per token",
    "params_total": "total parameters",
    "train_flops": "training FLOPs (whole run)",
}

def routing_color(routing: str) -> str:
    if routing in ROUTING_COLORS:
        return ROUTING_COLORS[routing]
    return _OTHER_COLORS[sum(map(ord, str(routing))) % len(_OTHER_COLORS)]


def routing_name(routing: str) -> str:
    return ROUTING_NAMES.get(routing, str(routing))


def shade(color: str, rank: int, n: int) -> tuple[float, float, float]:
    """The colour blended towards white for smaller models (rank 0 of n is the lightest)."""
    if n <= 1:
        return to_rgb(color)
    k = 0.45 + 0.55 * rank / (n - 1)  # 45% .. 100% of the full colour
    return tuple(1 - k * (1 - c) for c in to_rgb(color))  # type: ignore[return-value]


def tidy_log_axis(ax: Any, which: str) -> None:
    """Readable ticks on a log axis: plain/SI labels, and enough of them on a narrow range."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    if not (lo > 0 and hi > lo):
        return
    decades = math.log10(hi / lo)
    if decades < 1.0:
        ticks = [
            t for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi
        ]
        axis.set_major_locator(FixedLocator(ticks))
    else:
        axis.set_major_locator(LogLocator(10, subs=(1.0, 2.0, 5.0) if decades < 3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: si(v)))
    axis.set_minor_formatter(NullFormatter())


class Layout:
    """Labels of a study's runs: size name and order, series, colour and style per run."""

    def __init__(self, data: CollectResult) -> None:
        runs = data.runs
        self.runs = runs
        self.size = size_labels(runs, data.axes)
        self.sizes = size_order(runs, self.size)
        self.series = series_labels(runs, data.axes)
        self.routing = (
            runs["routing"].astype(str) if "routing" in runs else pd.Series("run", index=runs.index)
        )
        self.series_order = series_order(runs, self.series)

    def _routing_of(self, series: str) -> str:
        return str(self.routing[self.series == series].iloc[0])

    def color(self, series: str) -> str:
        return routing_color(self._routing_of(series))

    def linestyle(self, series: str) -> str:
        r = self._routing_of(series)
        same = [s for s in self.series_order if self._routing_of(s) == r]
        return SERIES_STYLES[same.index(series) % len(SERIES_STYLES)]

    def label(self, series: str) -> str:
        r = self._routing_of(series)
        return routing_name(r) + series[len(r) :] if series.startswith(r) else str(series)

    def marker(self, size: str) -> str:
        return SIZE_MARKERS[self.sizes.index(size) % len(SIZE_MARKERS)] if size in self.sizes else "o"

    def sized_color(self, series: str, size: str) -> tuple[float, float, float]:
        rank = self.sizes.index(size) if size in self.sizes else len(self.sizes) - 1
        return shade(self.color(series), rank, len(self.sizes))

    def series_legend(self, series: list[str] | None = None) -> list[Line2D]:
        return [
            Line2D([], [], color=self.color(s), ls=self.linestyle(s), lw=2, label=self.label(s))
            for s in (series or self.series_order)
        ]

    def size_legend(self, sizes: list[str] | None = None) -> list[Line2D]:
        return [
            Line2D([], [], color="0.35", marker=self.marker(s), ls="", label=f"size {s}")
            for s in (self.sizes if sizes is None else sizes)
        ]


def grid(n: int, width: float = 4.2, height: float = 3.3, ncols: int = 3) -> tuple[Figure, list[Any]]:
    ncols = min(ncols, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.9), squeeze=False)
    flat = list(axs.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def finish(fig: Figure, title: str, handles: list[Line2D], note: str = "") -> Figure:
    # About 9 bold 11-pt characters per inch: wrap so a one-panel figure keeps its whole title.
    lines = textwrap.wrap(title, max(30, int(9 * fig.get_figwidth())))
    fig.suptitle("\n".join(lines), fontsize=11, fontweight="bold", y=0.995)
    extra = 0.18 / fig.get_figheight() * (len(lines) - 1)  # figure fraction per extra title line
    if note:
        fig.text(0.5, 0.955 - extra, note, ha="center", va="top", fontsize=7.5, color="0.35", wrap=True)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), bbox_to_anchor=(0.5, 0.0))
    rows = math.ceil(len(handles) / 5) if handles else 0
    fig.tight_layout(rect=(0, 0.035 + 0.04 * rows, 1, (0.93 if note else 0.95) - extra))
    return fig


def status_suffix(row: pd.Series) -> str:
    if row["status"] == "done":
        return ""
    step = row.get("step")
    at = f" at step {int(step)}" if isinstance(step, (int, float)) and math.isfinite(step) else ""
    return f" ({row['status']}{at})"
