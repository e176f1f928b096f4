"""Optimisation risk of App. A on hand-built attention (spec abmilx §4.2, invariant 12)."""

import numpy as np
import pandas as pd
import pytest

from milstudy.analysis.risk import cohort_risk, head_correlation, multi_head_risk, optimization_risk, risk_over_epochs


def test_single_head_hand_values():
    a = np.array([0.4, 0.3, 0.2, 0.1])
    y = np.array([0, 1, 0, 0])  # tumour = patch 1; noise = 0, 2, 3
    r = optimization_risk(a, y)
    assert r["risk"] == pytest.approx(0.4)
    assert r["n_risk"] == pytest.approx(1.6)
    assert r["risk_mh"] == pytest.approx(0.4)
    assert r["mass_on_tumour"] == pytest.approx(0.3)
    assert r["top1_is_noise"] is True
    assert np.isnan(r["head_correlation"])
    assert r["witness_rate"] == pytest.approx(0.25)


def test_multi_head_hand_values():
    a = np.array([[0.7, 0.1, 0.1, 0.1],   # head 1: noise max 0.7
                  [0.1, 0.1, 0.2, 0.6]])  # head 2: noise max 0.6 (patch 3); patch 1 is tumour
    y = np.array([0, 1, 0, 0])
    r = optimization_risk(a, y)
    assert r["risk_mh"] == pytest.approx((0.7 + 0.6) / 2)
    assert r["risk_max_head"] == pytest.approx(0.7)
    assert r["risk"] == pytest.approx(0.4)  # head mean [0.4, 0.1, 0.15, 0.35]
    assert r["mass_on_tumour"] == pytest.approx(0.1)
    # correlation of the two heads by hand
    c = np.corrcoef(a[0], a[1])[0, 1]
    assert r["head_correlation"] == pytest.approx(c)


def test_eq7_eq9_mean_of_head_maxima_is_bounded_by_max_with_equality_for_identical_heads():
    rng = np.random.default_rng(1)
    noise = np.ones(30, dtype=bool)
    noise[:3] = False
    for _ in range(20):
        a = rng.dirichlet(np.full(30, 0.5), size=4)
        assert multi_head_risk(a, noise) <= a[:, noise].max() + 1e-15
    same = np.tile(rng.dirichlet(np.full(30, 0.5)), (4, 1))
    assert multi_head_risk(same, noise) == pytest.approx(same[:, noise].max())
    assert head_correlation(same) == pytest.approx(1.0)


def test_cohort_skips_negatives_and_aggregates_per_epoch():
    a_pos = np.array([0.1, 0.6, 0.3])
    y_pos = np.array([0, 1, 0])
    a_neg = np.full(3, 1 / 3)
    frames = [cohort_risk([a_pos, a_neg], [y_pos, np.zeros(3)], epoch=e) for e in (0, 1)]
    table = pd.concat(frames)
    assert len(table) == 2 and set(table["epoch"]) == {0, 1}
    curves = risk_over_epochs(table)
    assert curves.loc[0, "risk"] == pytest.approx(0.3)
    assert curves.loc[0, "top1_is_noise"] == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="positive slide"):
        optimization_risk(np.full(3, 1 / 3), np.zeros(3))
    with pytest.raises(ValueError, match="N=3"):
        optimization_risk(np.full(3, 1 / 3), np.array([0, 1]))
    with pytest.raises(ValueError, match="epoch"):
        risk_over_epochs(cohort_risk([np.array([0.5, 0.5])], [np.array([0, 1])]))
