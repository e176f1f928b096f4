"""Theorem 1 of ASMIL checked numerically (specs/asmil.md §6.2-6.4)."""

import numpy as np
import pytest
from scipy.special import softmax

from milstudy.analysis import nsf_theory as nt


def test_nsf_matches_softmax_in_the_low_regime_and_is_not_shift_invariant():
    u = np.random.default_rng(0).uniform(-3, 3, size=50)
    np.testing.assert_allclose(nt.nsf_np(u - 30.0), softmax(u), rtol=0, atol=1e-10)
    assert not np.allclose(nt.nsf_np(u + 2.0), nt.nsf_np(u))
    curve = nt.shift_curve(u, [-30.0, 0.0, 10.0])
    assert curve["softmax_entropy"].nunique() == 1
    assert curve["nsf_entropy"].is_monotonic_increasing  # higher offset -> saturated sigmoid -> flatter
    assert curve["nsf_entropy"].iloc[-1] > 0.999


@pytest.mark.parametrize("tau", [-1.0, 0.0, 2.0, 6.0])
def test_theorem_1a_bounds_hold_on_random_vectors_of_the_set(tau):
    row = nt.empirical_nsf(tau, delta=1.0, ell=tau - 3.0, h=4, n_low=20, n_draws=3000, seed=1)
    assert row["max_high_ratio"] <= row["nsf_high_ratio"] + 1e-12
    assert row["max_low_weight"] <= row["nsf_low_bound"] + 1e-12
    assert row["max_high_ratio"] > 1.0  # the draw actually spreads the highs


def test_theorem_1a_high_ratio_bound_decreases_to_one():
    table = nt.theorem1_table(np.linspace(-5, 30, 71), delta=1.0, ell=-8.0, h=4)
    ratios = table["nsf_high_ratio"].to_numpy()
    assert np.all(np.diff(ratios) <= 1e-15)
    assert ratios[0] > 2.0 and ratios[-1] - 1 < 1e-12


def test_theorem_1b_no_temperature_meets_both_targets_beyond_tau_star():
    table = nt.theorem1_table(np.arange(-20.0, 25.0, 0.5), delta=1.0, ell=-25.0, h=4)
    tau_star = nt.first_infeasible_tau(table)
    assert np.isfinite(tau_star)
    late = table[table["tau"] >= tau_star]
    assert (late["t_min"] > late["t_max"]).all()
    # deep in the low regime NSF ~ softmax at T = 1: both bounds of the window approach 1 ...
    assert abs(table["t_min"].iloc[0] - 1) < 1e-3 and abs(table["t_max"].iloc[0] - 1) < 1e-2
    # ... and the gap then opens: t_min grows like e^tau, t_max linearly
    gap = (table["t_min"] / table["t_max"]).to_numpy()
    assert np.all(np.diff(gap[table["tau"].to_numpy() >= 0]) > 0) and gap[-1] > 1e6
    grid = nt.softmax_grid(6.0, 1.0, -2.0, 4, np.geomspace(0.01, 1e4, 200))
    assert not grid["meets_both"].any()
    assert grid["meets_ratio"].any() and grid["meets_low"].any()  # each alone is reachable


def test_softmax_window_edges_are_where_softmax_meets_each_target_exactly():
    tau, delta, ell, h = 3.0, 1.0, -6.0, 2
    a = nt.nsf_bounds(tau, delta, ell, h)
    w = nt.softmax_window(tau, delta, ell, h, a["nsf_high_ratio"] - 1, a["nsf_low_bound"])
    at_min, at_max = nt.softmax_grid(tau, delta, ell, h, [w["t_min"], w["t_max"]]).itertuples()
    assert at_min.softmax_high_ratio == pytest.approx(a["nsf_high_ratio"], rel=1e-9)
    assert at_max.softmax_low_weight == pytest.approx(a["nsf_low_bound"], rel=1e-6)  # the "far" lows add ~0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="delta > 0"):
        nt.nsf_bounds(0.0, 0.0, -1.0, 2)
    with pytest.raises(ValueError, match="ell < tau"):
        nt.theorem1_table([-3.0, 0.0], delta=1.0, ell=-2.0)


def test_target_concentration_orders_the_targets_as_the_theorem_says():
    rng = np.random.default_rng(3)
    z = np.r_[rng.uniform(4, 5, 10), rng.uniform(-6, -2, 190)]  # 10 high logits, 190 low ones
    table = nt.target_concentration({"s": z}, temperatures=[1.0])
    nsf, soft = (table[table["target"] == k].iloc[0] for k in ("NSF", "softmax"))
    assert nsf["top_ratio"] < soft["top_ratio"]  # NSF equalises the top tiles ...
    assert nsf["top_ratio"] < 1.2
    assert nsf["top1_mass"] < soft["top1_mass"]
    both = nt.target_concentration({"s": np.stack([z, z])}, temperatures=[1.0])  # [heads, N] head mean
    np.testing.assert_allclose(both["normalized_entropy"], table["normalized_entropy"])
