"""Seeds mixed from integers: stable across runs, hosts and processes, and free of torch state.

Every random stream of a run is addressed by integers (the run's seed, a step, a rank, a
micro-batch, an expert id), so that a resumed or re-laid-out run draws exactly what an
uninterrupted one would. numpy's SeedSequence does the mixing: neighbouring inputs give
unrelated seeds. This module imports numpy only (no torch, no DeepSpeed).
"""

from __future__ import annotations

import numpy as np


def hash_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (each taken modulo 2^32)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)
