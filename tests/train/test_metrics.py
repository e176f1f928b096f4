"""Metrics against hand-computed values and scikit-learn / scikit-survival (specs/abmilx.md §6 invariants 17, 19)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from milstudy.train import metrics as M


def test_classification_metrics_known_values():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 0, 2]
    assert M.accuracy(y, pred) == pytest.approx(4 / 6)
    # per-class recall 2/3, 1/2, 1 -> balanced accuracy 13/18
    assert M.balanced_accuracy(y, pred) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # per-class F1: class0 p=2/3 r=2/3 -> 2/3; class1 p=1/2 r=1/2 -> 1/2; class2 -> 1
    assert M.f1(y, pred) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert M.f1(y, pred, "micro") == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="average"):
        M.f1(y, pred, "samples")


def test_binary_auc_uses_positive_class():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])  # one discordant pair of four -> 0.75
    assert M.roc_auc(y, np.stack([1 - p1, p1], 1)) == pytest.approx(0.75)
    assert M.roc_auc(y, p1) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one class"):
        M.roc_auc([1, 1], [0.2, 0.3])


def test_multiclass_auc_is_sklearn_macro_ovr():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    logits = rng.normal(size=(30, 3)) + np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean([skm.roc_auc_score(y == k, prob[:, k]) for k in range(3)])
    assert M.roc_auc(y, prob.astype(np.float32)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="undefined"):
        M.roc_auc([0, 1, 0], prob[:3])


def test_quadratic_kappa_known_value():
    # confusion [[1,1],[0,2]] for 2 grades: po = 3/4, pe = (2*1 + 2*3)/16 = 1/2 -> kappa = 0.5 (QWK = linear for 2 grades)
    assert M.quadratic_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)
    assert M.quadratic_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    # predicting far-off grades is penalised more than near ones
    near = M.quadratic_kappa([0, 1, 2, 3], [1, 1, 2, 3])
    far = M.quadratic_kappa([0, 1, 2, 3], [3, 1, 2, 3])
    assert far < near < 1


def test_c_index_invariants():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 1])
    assert M.c_index(time, event, [4, 3, 2, 1]) == 1.0  # earlier death, higher risk
    assert M.c_index(time, event, [1, 2, 3, 4]) == 0.0
    assert M.c_index(time, event, [5, 5, 5, 5]) == 0.5


def test_c_index_censored_case_never_the_earlier_member():
    # case 0 censored at t=1: pairs (0, j) are not comparable, so its risk cannot matter
    time = np.array([1.0, 2.0, 3.0])
    event = np.array([0, 1, 1])
    for risk0 in (-10.0, 0.0, 10.0):
        # comparable pairs: (1,2) only -> concordant since risk1 > risk2
        assert M.c_index(time, event, [risk0, 2.0, 1.0]) == 1.0
    # hand value: times 1..4, events [1,0,1,1], risk [4,3,1,2]
    # comparable: (0,1) conc, (0,2) conc, (0,3) conc, (2,3) risk2=1 < risk3=2 -> discordant => 3/4
    assert M.c_index([1, 2, 3, 4], [1, 0, 1, 1], [4, 3, 1, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no events"):
        M.c_index([1, 2], [0, 0], [1, 2])


def test_bootstrap_same_seed_same_result_and_constant_predictor():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    a = M.bootstrap_ci(M.roc_auc, y, p, n=100, seed=3)
    b = M.bootstrap_ci(M.roc_auc, y, p, n=100, seed=3)
    assert a == b
    assert a.lo <= a.mean <= a.hi and a.std > 0
    mean, std, lo, hi = M.bootstrap_ci(M.roc_auc, y, np.full(40, 0.3), n=100, seed=0)  # constant predictor
    assert (mean, std, lo, hi) == (0.5, 0.0, 0.5, 0.5)


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0] * 19 + [1])  # many resamples miss the single positive
    p = np.linspace(0, 1, 20)
    result = M.bootstrap_ci(M.roc_auc, y, p, n=200, seed=0)
    assert result.n_skipped > 0 and result.n_valid + result.n_skipped == 200
    assert result.mean == pytest.approx(1.0)


def test_bootstrap_tuple_targets_for_survival():
    time = np.arange(1.0, 11.0)
    event = np.ones(10)
    risk = -time
    result = M.bootstrap_ci(lambda y, r: M.c_index(y[0], y[1], r), (time, event), risk, n=50, seed=0)
    assert result.mean == pytest.approx(1.0) and result.std == 0.0


def test_summarize():
    assert M.summarize([0.5, 0.7]) == "0.600 ± 0.141"
    assert M.summarize([0.5]) == "0.500 ± 0.000"
    assert M.summarize([float("nan")]) == "n/a"
