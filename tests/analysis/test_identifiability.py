"""Non-identifiability of attention from the bag feature (specs/asmil.md §6.12)."""

import numpy as np
import pytest

from milstudy.analysis import identifiability as ident


def test_a_null_direction_gives_another_attention_with_the_same_bag_feature():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))  # N >= D + 2
    a = rng.dirichlet(np.ones(40))
    a2, t = ident.equivalent_attention(a, x)
    assert t > 0 and np.abs(a2 - a).max() > 1e-3
    assert a2.min() >= 0 and a2.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(x.T @ a2, x.T @ a, atol=1e-12)


def test_the_dependence_test_agrees_with_the_rank_criterion():
    rng = np.random.default_rng(1)
    wide = rng.normal(size=(5, 8))  # N < D + 1: generic [X, 1] has full row rank
    assert not ident.affinely_dependent(wide) and ident.null_direction(wide) is None
    assert ident.equivalent_attention(np.full(5, 0.2), wide) is None
    tall = rng.normal(size=(10, 8))  # N = D + 2
    assert ident.affinely_dependent(tall)
    # a degenerate small bag: two identical instances are dependent even with N < D + 1
    dup = np.vstack([wide, wide[:1]])
    assert ident.affinely_dependent(dup)
    v = ident.null_direction(dup)
    np.testing.assert_allclose(dup.T @ v, 0, atol=1e-10)
    assert abs(v.sum()) < 1e-10 and np.linalg.norm(v) == pytest.approx(1.0)
    assert ident.dependence_share([wide, tall, dup]) == pytest.approx(2 / 3)


def test_bad_attention_is_refused():
    x = np.random.default_rng(2).normal(size=(12, 3))
    with pytest.raises(ValueError, match="strictly positive"):
        ident.equivalent_attention(np.r_[1.0, np.zeros(11)], x)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        ident.affinely_dependent(np.zeros(4))
