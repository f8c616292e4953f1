"""The routing gap over seeds, the paper-claim verdicts and the pooled compute allocation."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ecdit_cli.study import allocation, claims, gaps

AXES = ["size", "routing", "num_experts", "capacity_factor", "seed"]
SIZES = {"S": 1e5, "M": 1e6, "L": 1e7}


def _runs(loss) -> pd.DataFrame:
    """A done study: dense / token choice E=8 / expert choice E=8 at three sizes, seeds 0-2 at S,
    one seed above; `loss(size, routing, seed)` gives each final validation loss."""
    rows = []
    for size, n in SIZES.items():
        for routing in ("dense", "token_choice", "expert_choice"):
            for seed in (0, 1, 2) if size == "S" else (0,):
                rows.append(dict(run_id=f"{size}-{routing}-s{seed}", size=size, routing=routing,
                                 num_experts=None if routing == "dense" else 8,
                                 capacity_factor=2.0 if routing == "expert_choice" else None, seed=seed,
                                 params_total=n * (1 if routing == "dense" else 3), params_active=n,
                                 train_flops=n * 1e6, final_val_loss=loss(size, routing, seed),
                                 status="done", eval_overall=0.1))  # fmt: skip
    return pd.DataFrame(rows)


NOISE = {0: 0.0, 1: 0.004, 2: -0.004}


def _base(size, routing, seed):
    return 0.2 / math.log10(SIZES[size]) + NOISE[seed]


def test_gaps_are_paired_by_seed_and_cells_aggregate_over_seeds():
    runs = _runs(lambda s, r, seed: _base(s, r, seed) * (0.9 if r == "expert_choice" and seed == 1 else 1.0))
    g = gaps.paired_gaps(runs, AXES, "expert_choice", "dense").set_index("size")
    # Per seed (L_ec - L_dense) / L_dense is 0, -0.1, 0 at S: mean -1/30, sd of those three.
    assert g.loc["S", "n"] == 3 and g.loc["S", "paired"]
    assert g.loc["S", "gap_mean"] == pytest.approx(-0.1 / 3)
    assert g.loc["S", "gap_sd"] == pytest.approx(np.std([0, -0.1, 0], ddof=1))
    assert g.loc["M", "gap_mean"] == pytest.approx(0.0) and math.isnan(g.loc["M", "gap_sd"])
    cells = gaps.by_size(runs, AXES).set_index(["size", "series"])
    s = [_base("S", "dense", k) for k in (0, 1, 2)]
    assert cells.loc[("S", "dense"), "loss_mean"] == pytest.approx(np.mean(s))
    assert cells.loc[("S", "dense"), "loss_sd"] == pytest.approx(np.std(s, ddof=1))
    assert list(cells.index.get_level_values(0).unique()) == ["S", "M", "L"]  # small to large


def test_different_seeds_compare_the_cell_means_and_a_single_seed_is_judged_with_the_pooled_spread():
    runs = _runs(lambda s, r, seed: _base(s, r, seed))
    runs.loc[(runs["routing"] == "expert_choice") & (runs["size"] == "M"), "seed"] = 7
    g = gaps.paired_gaps(runs, AXES, "expert_choice", "dense").set_index("size")
    assert not g.loc["M", "paired"] and g.loc["M", "gap_mean"] == pytest.approx(0.0)
    rep = pd.DataFrame({"n": [3, 5, 1], "gap_sd": [0.01, 0.02, math.nan]})
    pooled = gaps.noise_sd(rep)
    assert pooled == pytest.approx(math.sqrt((2 * 0.01**2 + 4 * 0.02**2) / 6))
    # One seed, a gap of 3 pooled sds: resolved; of 1.5 pooled sds: within the noise.
    assert gaps.verdict(-3 * pooled, math.nan, 1, pooled).sign == -1
    assert gaps.verdict(-1.5 * pooled, math.nan, 1, pooled).sign == 0
    assert gaps.verdict(+0.05, 0.01, 3, pooled).sign == 1  # its own spread where it has seeds


def test_trend_recovers_a_gap_that_widens_linearly_in_log_size():
    g = pd.DataFrame({"params_active": [1e5, 1e6, 1e7, 1e8], "gap_mean": [-0.01, -0.03, -0.05, -0.07],
                      "n": [3, 1, 1, 1]})  # fmt: skip
    slope, se, n = gaps.trend(g)
    assert slope == pytest.approx(-0.02) and se == pytest.approx(0.0, abs=1e-12) and n == 4
    assert gaps.trend(g.iloc[:2]) is None


NO_SPEEDUP = pd.DataFrame(columns=["series", "size", "speedup_steps"])
NO_ALLOCATION = pd.DataFrame(columns=allocation.COLUMNS)


def _found(runs) -> dict[str, claims.Finding]:
    return {f.claim: f for f in claims.findings(runs, AXES, NO_SPEEDUP, NO_ALLOCATION)}


def test_claims_follow_the_stated_rules():
    widening = {"S": 0.97, "M": 0.94, "L": 0.90}
    good = _runs(lambda s, r, seed: _base(s, r, seed) * (widening[s] if r == "expert_choice" else 1.0))
    found = _found(good)
    beats_dense = next(f for c, f in found.items() if "faster than dense" in c)
    assert beats_dense.verdict == claims.REPRODUCED and "S -3.0%" in beats_dense.measured
    grows = next(f for c, f in found.items() if "grows with scale" in c)
    assert grows.verdict == claims.REPRODUCED
    no_tc16 = next(f for c, f in found.items() if "token choice with 16" in c)
    assert no_tc16.verdict == claims.NOT_TESTABLE  # the study has no E=16 token choice
    assert all(f.verdict == claims.NOT_TESTABLE for c, f in found.items() if "patches" in c or "layers" in c)

    # Expert choice worse than dense at the largest size, beyond the noise: not reproduced.
    worse = _runs(lambda s, r, seed: _base(s, r, seed) * ((1.10 if s == "L" else 0.97) if r == "expert_choice"
                                                          else 1.0))  # fmt: skip
    found = _found(worse)
    assert next(f for c, f in found.items() if "faster than dense" in c).verdict == claims.NOT_REPRODUCED
    assert next(f for c, f in found.items() if "grows with scale" in c).verdict == claims.NOT_REPRODUCED


def _analyze_doc(run_id, obj, bg, cv):
    layers = [{"block": b, "object_mean": [o, o], "background_mean": [g, g], "cv": [c, c]}
              for b, o, g, c in zip((1, 3), obj, bg, cv, strict=True)]  # fmt: skip
    return {"run_id": run_id, "routing": "expert_choice",
            "ground_truth": {"layers": layers, "object_tokens": 10, "background_tokens": 50}}  # fmt: skip


def test_allocation_pools_the_seeds_of_a_run_and_feeds_the_depth_claim(tmp_path):
    for seed, (obj, cv_late) in enumerate([(2.4, 0.6), (2.2, 0.5)]):
        d = tmp_path / allocation.ANALYZE_DIR / f"L-ec-s{seed}"
        d.mkdir(parents=True)
        (d / allocation.ANALYZE_JSON).write_text(json.dumps(_analyze_doc(f"L-ec-s{seed}", (obj, 1.5), (2.0, 2.1),
                                                                         (0.4, cv_late))))  # fmt: skip
    (tmp_path / allocation.ANALYZE_DIR / "broken").mkdir()
    (tmp_path / allocation.ANALYZE_DIR / "broken" / allocation.ANALYZE_JSON).write_text("{")
    layers, warnings = allocation.layer_table(tmp_path)
    assert len(layers) == 4 and len(warnings) == 1 and "broken" in warnings[0]
    runs = pd.DataFrame({"run_id": ["L-ec-s0", "L-ec-s1"], "seed": [0, 1], "params_active": [1e6, 1e6]})
    table = allocation.pooled(layers, runs).set_index("block")
    assert table.loc[1, "group"] == "L-ec" and table.loc[1, "n"] == 2
    assert table.loc[1, "ratio_mean"] == pytest.approx((2.4 / 2.0 + 2.2 / 2.0) / 2)
    assert table.loc[1, "ratio_sd"] == pytest.approx(np.std([1.2, 1.1], ddof=1))
    obj, depth = claims._allocation(layers, runs)
    assert obj.verdict == claims.PARTLY  # more experts on objects in block 1, fewer in block 3
    assert depth.verdict == claims.REPRODUCED and "2 seeds" in obj.measured  # CV 0.4 early < 0.55 late
