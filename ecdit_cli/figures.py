"""Figures: matplotlib without a display, the house style, and saving a Figure as PNG and SVG.

Importing this module selects the Agg backend (files only, also on a laptop with a display)
and sets the style every ecdit figure shares (grid, no top/right spines, 9 pt text); SVG
output is deterministic (fixed ids, no date), so re-plotting unchanged data rewrites the same
bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from ecdit_cli.files import atomic_write_bytes  # noqa: E402

DPI = 150

plt.rcParams.update({
    "figure.dpi": 110, "savefig.dpi": DPI, "axes.grid": True, "grid.alpha": 0.25,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False, "font.size": 9,
    "svg.hashsalt": "ecdit",  # deterministic SVG ids
    "svg.fonttype": "none",  # text stays text in SVGs: smaller, editable, faster to write
})  # fmt: skip


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """The figure as PNG or SVG bytes (at DPI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def save_figure(fig, folder: str | Path, stem: str) -> dict[str, Path]:
    """Write `stem`.png and `stem`.svg atomically into `folder`; returns {"png": path, "svg": path}."""
    out = {}
    for fmt in ("png", "svg"):
        path = Path(folder) / f"{stem}.{fmt}"
        atomic_write_bytes(path, figure_bytes(fig, fmt))
        out[fmt] = path
    return out
