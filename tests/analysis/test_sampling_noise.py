"""P(no tumour patch among s sampled): closed forms vs Monte-Carlo (ours; spec abmilx issue "Sampling label noise")."""

import numpy as np
import pytest
from math import comb

from milstudy.analysis.sampling_noise import (
    cohort_no_witness,
    measured_no_witness,
    no_witness_curve,
    p_no_witness_with_replacement,
    p_no_witness_without_replacement,
    uniform_sampler,
)


def test_closed_forms_by_hand():
    assert p_no_witness_without_replacement(10, 2, 3) == pytest.approx(comb(8, 3) / comb(10, 3))
    assert p_no_witness_without_replacement(10, 2, 9) == 0.0  # only 8 normal patches
    assert p_no_witness_without_replacement(10, 2, 20) == 0.0  # s ≥ N: every patch is taken
    assert p_no_witness_without_replacement(10, 0, 3) == 1.0
    assert p_no_witness_with_replacement(0.1, 2) == pytest.approx(0.81)
    # without replacement is never above with replacement at the same witness rate
    assert p_no_witness_without_replacement(100, 5, 30) < p_no_witness_with_replacement(0.05, 30)


def test_monte_carlo_matches_closed_form():
    y = np.zeros(200, dtype=int)
    y[[3, 50, 120, 199]] = 1  # witness rate 2 %
    for s in (16, 64):
        measured = measured_no_witness(y, s, n_draws=4000, seed=0)
        assert measured == pytest.approx(p_no_witness_without_replacement(200, 4, s), abs=0.03)
        with_rep = measured_no_witness(y, s, n_draws=4000, sampler=uniform_sampler(replace=True), seed=1)
        assert with_rep == pytest.approx(p_no_witness_with_replacement(0.02, s), abs=0.03)


def test_sampler_draws_distinct_indices_and_takes_all_when_small():
    rng = np.random.default_rng(0)
    idx = uniform_sampler()(50, 10, rng, 100)
    assert idx.shape == (100, 10) and all(len(set(row)) == 10 for row in idx)
    assert uniform_sampler()(5, 10, rng, 3).shape == (3, 5)


def test_curve_and_cohort_tables():
    curve = no_witness_curve([0.01, 0.1], [8, 64], n_instances=500)
    assert len(curve) == 4
    # monotone: more samples or more witnesses -> less label noise
    p = curve.set_index(["witness_rate", "s"])["p_without_replacement"]
    assert p[(0.01, 64)] < p[(0.01, 8)] and p[(0.1, 8)] < p[(0.01, 8)]
    labels = [np.array([0, 0, 1, 0] * 10), np.zeros(40)]
    table = cohort_no_witness(labels, [4, 8], n_draws=500)
    assert len(table) == 2 and (table["witness_rate"] == 0.25).all()
    assert (abs(table["p_measured"] - table["p_closed_form"]) < 0.06).all()


def test_bad_input():
    with pytest.raises(ValueError, match="T=5"):
        p_no_witness_without_replacement(3, 5, 2)


def test_mris_main_scale_matches_the_hypergeometric_of_its_main_quota():
    from milstudy.analysis.sampling_noise import mris_main_scale_sampler
    from milstudy.data.instance_sampling import mris_quota

    y = np.zeros(120, dtype=int)
    y[:3] = 1
    n_main, _ = mris_quota(32, 4.0)  # 24 main-scale patches
    measured = measured_no_witness(y, 32, n_draws=3000, sampler=mris_main_scale_sampler(4.0), seed=0)
    assert measured == pytest.approx(p_no_witness_without_replacement(120, 3, n_main), abs=0.03)
