import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from ecdit_cli.study import fit as fitmod
from ecdit_cli.study.fit import (
    ChinchillaFit,
    FitError,
    PowerLawFit,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    fit_table,
    holdout_largest,
    predict,
    predict_chinchilla,
    prediction_band,
    results_to_frame,
    to_dict,
)
from ecdit_cli.study.gains import convergence_speedup, effective_params

E_TRUE, ALPHA_TRUE = 2.0, 0.35


def noisy_power_law(scale, seed, n=8, decades=3.0, noise=0.015):
    """E + A x^-alpha over `decades` from x = scale, where the reducible loss A x^-alpha is 8."""
    x = scale * np.logspace(0, decades, n)
    a_true = 8.0 * scale**ALPHA_TRUE
    rng = np.random.default_rng(seed)
    y = (E_TRUE + a_true * x**-ALPHA_TRUE) * np.exp(rng.normal(0, noise, n))
    return x, y, a_true


def reducible_at_geomean(E, A, alpha, x):
    del E
    return A * np.exp(np.log(x).mean()) ** -alpha


@pytest.mark.parametrize("scale", [1e3, 1e9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_recovers_known_parameters_from_noisy_data(scale, seed):
    x, y, a_true = noisy_power_law(scale, seed)
    f = fit_power_law(x, y, n_boot=0)
    assert f.converged and f.n == 8
    assert abs(f.alpha - ALPHA_TRUE) < 0.03
    assert abs(f.E - E_TRUE) / E_TRUE < 0.08
    # A alone trades off against alpha by a factor g^d_alpha (g = geometric mean of x, ~1e10 at the
    # 1e9 scale), so it is checked where the data are: the reducible loss at g.
    got = reducible_at_geomean(f.E, f.A, f.alpha, x)
    want = reducible_at_geomean(E_TRUE, a_true, ALPHA_TRUE, x)
    assert abs(got / want - 1) < 0.10
    assert f.rmse_log < 0.03 and f.r2_log > 0.99
    np.testing.assert_allclose(predict(f, x), E_TRUE + a_true * x**-ALPHA_TRUE, rtol=0.02)


def test_power_law_fit_is_the_same_whatever_the_units_of_x():
    x, y, _ = noisy_power_law(1e3, seed=4)
    small, big = fit_power_law(x, y, n_boot=0), fit_power_law(x * 1e6, y, n_boot=0)
    assert big.E == pytest.approx(small.E, rel=1e-6)
    assert big.alpha == pytest.approx(small.alpha, rel=1e-6)
    assert big.A == pytest.approx(small.A * 1e6**small.alpha, rel=1e-5)


def test_bootstrap_intervals_cover_the_true_parameters_in_most_trials():
    covered = {"E": 0, "A": 0, "alpha": 0}
    for trial in range(20):
        x, y, a_true = noisy_power_law(1e6, seed=100 + trial)
        f = fit_power_law(x, y, n_boot=20, seed=trial)
        assert f.n_boot_ok >= 16
        for name, truth in (("E", E_TRUE), ("A", a_true), ("alpha", ALPHA_TRUE)):
            lo, hi = f.ci[name]
            assert lo <= getattr(f, name) <= hi
            covered[name] += lo <= truth <= hi
        assert f.ci["alpha"][1] - f.ci["alpha"][0] < 0.4
    assert all(c >= 14 for c in covered.values()), covered


def test_prediction_band_brackets_the_fitted_curve_and_widens_when_extrapolating():
    x, y, _ = noisy_power_law(1e3, seed=7)
    f = fit_power_law(x, y, n_boot=30, seed=0)
    grid = np.logspace(3, 8, 20)
    lo, hi = prediction_band(f, grid)
    mid = predict(f, grid)
    assert lo.shape == hi.shape == (20,)
    assert np.all(lo <= hi) and np.mean((lo <= mid) & (mid <= hi)) > 0.9
    assert (hi - lo)[-1] > (hi - lo)[5]
    with pytest.raises(FitError, match="n_boot > 0"):
        prediction_band(fit_power_law(x, y, n_boot=0), grid)


def test_chinchilla_recovers_all_five_parameters_from_a_noisy_grid():
    truth = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6)))
    clean = truth["E"] + truth["A"] * n ** -truth["alpha"] + truth["B"] * d ** -truth["beta"]
    y = clean * np.exp(np.random.default_rng(0).normal(0, 0.01, n.size))
    f = fit_chinchilla(n, d, y, n_boot=10, seed=0)
    assert f.converged and f.n == 36 and f.n_boot_ok >= 8
    assert abs(f.alpha - truth["alpha"]) < 0.03 and abs(f.beta - truth["beta"]) < 0.03
    assert abs(f.E - truth["E"]) / truth["E"] < 0.08
    assert 0.6 < f.A / truth["A"] < 1.6 and 0.6 < f.B / truth["B"] < 1.6
    np.testing.assert_allclose(predict_chinchilla(f, n, d), clean, rtol=0.015)


def _known_chinchilla(**kw):
    p = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28, **kw}
    return ChinchillaFit(**p, ci={}, n=0, rmse_log=0.0, r2_log=1.0, converged=True, n_boot=0, n_boot_ok=0)


@pytest.mark.parametrize("k", [6.0, 2.0])
def test_compute_optimal_allocation_spends_the_whole_budget_and_matches_the_closed_form(k):
    f = _known_chinchilla()
    budgets = np.array([1e18, 1e21, 1e24])
    opt = compute_optimal(f, budgets, k=k)
    np.testing.assert_allclose(k * opt.N_opt * opt.D_opt, budgets, rtol=1e-10)
    assert opt.a == pytest.approx(0.28 / 0.62) and opt.a + opt.b == pytest.approx(1.0)
    for c, n_opt, loss in zip(budgets, opt.N_opt, opt.loss_opt, strict=True):
        res = minimize_scalar(lambda logn, c=c: predict_chinchilla(f, np.exp(logn), c / (k * np.exp(logn))),
                              bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
        assert np.exp(res.x) == pytest.approx(n_opt, rel=1e-4)
        assert res.fun == pytest.approx(loss, rel=1e-9)


def test_compute_optimal_exponent_gets_an_interval_from_the_bootstrap():
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5)))
    y = 1.7 + 400 * n**-0.34 + 410 * d**-0.28
    f = fit_chinchilla(n, d, y * np.exp(np.random.default_rng(1).normal(0, 0.005, n.size)), n_boot=10)
    opt = compute_optimal(f, 1e21)
    assert opt.a_ci[0] <= opt.a <= opt.a_ci[1]
    assert abs(opt.a - 0.28 / 0.62) < 0.04


def test_holdout_prediction_of_the_largest_size_is_close_on_clean_data():
    x = np.logspace(6, 9, 7)
    res = holdout_largest(x, 2.0 + 300 * x**-0.3)
    assert res.x_held == pytest.approx(1e9) and res.fit.n == 6
    assert abs(res.rel_error) < 1e-3


def test_holdout_needs_four_distinct_sizes():
    with pytest.raises(FitError, match="at least 4 distinct x"):
        holdout_largest([1e6, 1e7, 1e8, 1e8], [3.0, 2.5, 2.2, 2.21])


def test_effective_parameter_multiplier_matches_a_hand_computed_case():
    dense = PowerLawFit(E=2.0, A=10.0, alpha=0.5, ci={}, n=5, rmse_log=0, r2_log=1, converged=True,
                        n_boot=0, n_boot_ok=0)
    # 2.1 = 2 + 10 / sqrt(N)  =>  N = (10 / 0.1)^2 = 1e4, four times the MoE's 2500.
    res = effective_params(dense, n_moe=2500, loss_moe=2.1)
    assert res.n_equiv == pytest.approx(1e4) and res.multiplier == pytest.approx(4.0) and res.reason == ""
    beyond = effective_params(dense, n_moe=2500, loss_moe=1.9)
    assert np.isnan(beyond.n_equiv) and np.isnan(beyond.multiplier)
    assert "asymptote" in beyond.reason
    # Inside the dense runs' range: no caveat; past it: flagged as an extrapolation, value kept.
    assert effective_params(dense, 2500, 2.1, dense_range=(1e3, 1e5)).note == ""
    far = effective_params(dense, 2500, 2.001, dense_range=(1e3, 1e5))
    assert far.n_equiv == pytest.approx(1e8) and far.note.startswith("extrapolated: 1e+03x the largest")


def dense_curve(x):
    return 2.0 + 5.0 * x**-0.3


def test_a_curve_exactly_twice_as_fast_gives_a_speedup_of_two():
    x = np.arange(100, 10_001, 100.0)
    res = convergence_speedup(x, dense_curve(x), x, dense_curve(2 * x))
    assert res.x_moe == pytest.approx(5000) and res.speedup == pytest.approx(2.0)
    # Logged on another grid, the crossing falls between points and is interpolated.
    xm = np.arange(70, 10_001, 70.0)
    res = convergence_speedup(x, dense_curve(x), xm, dense_curve(2 * xm))
    assert res.fraction == pytest.approx(0.5, rel=1e-3) and res.speedup == pytest.approx(2.0, rel=1e-3)


def test_smoothing_recovers_the_speedup_of_noisy_curves():
    x = np.arange(100, 10_001, 50.0)
    rng = np.random.default_rng(0)
    dense = dense_curve(x) + rng.normal(0, 0.003, x.size)
    moe = dense_curve(2 * x) + rng.normal(0, 0.003, x.size)
    res = convergence_speedup(x, dense, x, moe, smooth=15)
    assert res.speedup == pytest.approx(2.0, rel=0.15)


def test_a_curve_that_never_reaches_the_dense_loss_gives_none_with_a_reason():
    x = np.arange(100, 10_001, 100.0)
    res = convergence_speedup(x, dense_curve(x), x, dense_curve(x) + 0.05)
    assert res.x_moe is None and res.speedup is None and res.fraction is None
    assert "never reaches" in res.reason
    assert json.dumps(to_dict(res), allow_nan=False)


def test_speedup_rejects_unsorted_steps():
    with pytest.raises(FitError, match="strictly increasing"):
        convergence_speedup([1, 3, 2], [3.0, 2.0, 1.0], [1, 2, 3], [3.0, 2.0, 1.0])


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1e6, 1e7], [3.0, 2.5], "need at least 3 points"),
        ([1e6, 1e6, 1e7, 1e7], [3.0, 3.1, 2.5, 2.4], r"3 distinct values .* got 4 points \(2 distinct\)"),
        ([1e6, -1e7, 1e8], [3.0, 2.5, 2.2], "x must be finite and > 0"),
        ([1e6, 1e7, 1e8], [3.0, 0.0, 2.2], "y must be finite and > 0"),
        ([1e6, 1e7, 1e8], [3.0, np.nan, 2.2], "y must be finite and > 0"),
    ],
)
def test_bad_inputs_raise_a_clear_fit_error(x, y, match):
    with pytest.raises(FitError, match=match) as err:
        fit_power_law(x, y, n_boot=0)
    assert "\n" not in str(err.value)  # one line, as the CLI prints it


def test_a_fit_that_does_not_converge_raises_unless_asked_to_flag_it(monkeypatch):
    real = fitmod.minimize

    def never_converges(*args, **kwargs):
        res = real(*args, **kwargs)
        res.success, res.message = False, "ABNORMAL: stubbed"
        return res

    monkeypatch.setattr(fitmod, "minimize", never_converges)
    x, y, _ = noisy_power_law(1e3, seed=0)
    with pytest.raises(FitError, match="did not converge"):
        fit_power_law(x, y, n_boot=0)
    flagged = fit_power_law(x, y, n_boot=3, strict=False)
    assert not flagged.converged and any("did not converge" in w for w in flagged.warnings)
    assert flagged.n_boot_ok == 0 and np.isnan(flagged.ci["alpha"][0])
    assert to_dict(flagged)["alpha_lo"] is None


def test_warnings_flag_an_exponent_at_its_bound_and_a_vanishing_asymptote():
    x = np.logspace(3, 6, 7)
    assert any("E ~ 0" in w for w in fit_power_law(x, 5 * x**-0.2, n_boot=0).warnings)
    assert any("at its bound" in w for w in fit_power_law(x, 1 + 0.01 * np.log(x), n_boot=0).warnings)


def _runs_table():
    rows = []
    for routing, a in (("dense", 8.0), ("expert_choice", 6.0)):
        for n in np.logspace(6, 8, 5):
            rows.append({"routing": routing, "params": n, "val_loss": 2.0 + a * (n / 1e6) ** -0.3})
    return pd.DataFrame(rows)


def test_fit_table_gives_one_json_ready_result_per_group():
    results = fit_table(_runs_table(), "params", "val_loss", group="routing", n_boot=5)
    assert [r.group for r in results] == ["dense", "expert_choice"]
    assert all(abs(r.alpha - 0.3) < 0.01 for r in results)
    frame = results_to_frame(results)
    for col in ("group", "E", "A", "alpha", "E_lo", "E_hi", "alpha_lo", "alpha_hi", "n", "rmse_log", "r2_log",
                "converged", "warnings"):
        assert col in frame.columns
    assert json.dumps([to_dict(r) for r in results], allow_nan=False)
    assert len(fit_table(_runs_table(), "params", "val_loss", n_boot=0)) == 1


def test_fit_table_names_a_missing_column_and_suggests_a_close_one():
    match = r"no column 'val_los'.*did you mean 'val_loss'.*available: routing, params"
    with pytest.raises(FitError, match=match):
        fit_table(_runs_table(), "params", "val_los")
    with pytest.raises(FitError, match="no group column 'routng'.*did you mean 'routing'"):
        fit_table(_runs_table(), "params", "val_loss", group="routng")


def test_fit_table_rejects_an_empty_table_and_a_non_numeric_column():
    with pytest.raises(FitError, match="empty"):
        fit_table(pd.DataFrame(columns=["params", "val_loss"]), "params", "val_loss")
    with pytest.raises(FitError, match="column 'routing' is not numeric"):
        fit_table(_runs_table(), "routing", "val_loss")
    bad = _runs_table().assign(val_loss=lambda d: d.val_loss.where(d.index != 3))
    with pytest.raises(FitError, match=r"1 missing value\(s\) \(rows \[3\]\)"):
        fit_table(bad, "params", "val_loss")


def test_errors_inside_a_group_name_the_group():
    df = _runs_table().iloc[:7]
    with pytest.raises(FitError, match="group 'expert_choice': need at least 3 points"):
        fit_table(df, "params", "val_loss", group="routing", n_boot=0)


def test_three_points_for_three_parameters_give_no_interval_instead_of_a_zero_width_one():
    x = np.array([1e5, 4e5, 1.6e6])
    fit = fit_power_law(x, 0.2 + 30 * x**-0.5, n_boot=50)
    assert fit.n_boot == fit.n_boot_ok == 0
    assert all(np.isnan(lo) and np.isnan(hi) for lo, hi in fit.ci.values())
    assert any("passes through every point" in w for w in fit.warnings)
    with pytest.raises(FitError, match="no bootstrap samples"):
        prediction_band(fit, x)
    # One more point and the bootstrap has something to resample.
    x4 = np.append(x, 6.4e6)
    fit4 = fit_power_law(x4, 0.2 + 30 * x4**-0.5 * np.array([1, 1.01, 0.99, 1]), n_boot=50)
    assert fit4.n_boot_ok > 0 and all(hi > lo for lo, hi in fit4.ci.values())
