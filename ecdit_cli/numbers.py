"""Numbers as text: compact SI counts (1.5G, 2.76M) and table cells (4 significant digits)."""

from __future__ import annotations

import math
from typing import Any

_SI = ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"))
# Parameter counts read as "1.2B", the ML habit; beyond T they are written out in full.
_COUNT = ((12, "T"), (9, "B"), (6, "M"), (3, "K"))


def si(value: float, digits: int = 3, *, count: bool = False, decimals: int | None = None) -> str:
    """1.5e9 -> '1.5G' ('1.5B' with `count`): `digits` significant digits, or `decimals` fixed ones."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"

    def num(v: float) -> str:
        return f"{v:.{decimals}f}" if decimals is not None else f"{v:.{digits}g}"

    if count and abs(value) >= 1e15:
        return num(value)
    for exp, suffix in _COUNT if count else _SI:
        if abs(value) >= 10**exp:
            return num(value / 10**exp) + suffix
    return num(value)


def sig(value: Any, digits: int = 4) -> str:
    """A table cell: `digits` significant digits, scientific outside [1e-3, 1e6), an em dash for
    missing values; a string passes through as it is."""
    if value is None or isinstance(value, str):
        return value or "—"
    value = float(value)
    if not math.isfinite(value):
        return "—"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def aligned_count(value: float) -> str:
    """Counts with fixed decimals per range (0.726B, 2.76M, 512) so a column of them lines up."""
    return si(value, count=True, decimals=3 if abs(value) >= 1e9 else 2 if abs(value) >= 1e3 else 0)


def plain(value: Any) -> str:
    """A config value as a label: 4.0 -> '4', 0.5 -> '0.5', missing (None, NaN, '') -> '-'."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
