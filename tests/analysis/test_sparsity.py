"""Sparsity measures on hand-built attention vectors (spec abmilx §4.2, invariant 18)."""

import numpy as np
import pytest
import torch

from milstudy.analysis.sparsity import (
    activated_instances,
    attention_sparsity,
    cohort_sparsity,
    effective_instances,
    gini,
    mass_fraction,
    normalized_entropy,
    summarize_sparsity,
    top_k_mass,
)


def test_uniform_attention_has_zero_sparsity_and_gini():
    a = np.full(8, 1 / 8)
    assert attention_sparsity(a) == 0.0
    assert gini(a) == pytest.approx(0.0, abs=1e-12)
    assert normalized_entropy(a) == pytest.approx(1.0)
    assert effective_instances(a) == pytest.approx(8.0)
    assert effective_instances(a, "entropy") == pytest.approx(8.0)
    assert mass_fraction(a, 0.9) == pytest.approx(8 / 8)  # 7 patches hold 0.875 < 0.9


def test_one_hot_attention_gives_the_maximum():
    n = 10
    a = np.zeros(n)
    a[3] = 1.0
    assert attention_sparsity(a) == pytest.approx(100 * (1 - 1 / n))
    assert gini(a) == pytest.approx((n - 1) / n)
    assert normalized_entropy(a) == pytest.approx(0.0)
    assert effective_instances(a) == pytest.approx(1.0)
    assert mass_fraction(a) == pytest.approx(1 / n)
    assert top_k_mass(a, 1) == pytest.approx(1.0)


def test_hand_computed_vector():
    a = np.array([0.5, 0.25, 0.125, 0.125])  # N=4, 1/N = 0.25: the first two are activated
    assert activated_instances(a).tolist() == [True, True, False, False]
    assert attention_sparsity(a) == pytest.approx(50.0)
    entropy = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 2 * 0.125 * np.log(0.125))  # = 1.75 log 2
    assert normalized_entropy(a) == pytest.approx(entropy / np.log(4))
    assert normalized_entropy(a) == pytest.approx(1.75 / 2)
    assert effective_instances(a) == pytest.approx(1 / (0.25 + 0.0625 + 2 * 0.015625))
    assert top_k_mass(a, 2) == pytest.approx(0.75)
    assert mass_fraction(a, 0.9) == pytest.approx(1.0)  # 0.875 after three patches
    assert mass_fraction(a, 0.75) == pytest.approx(0.5)
    # Gini by the mean-absolute-difference definition
    mad = np.abs(a[:, None] - a[None, :]).sum() / (2 * 4**2 * a.mean())
    assert gini(a) == pytest.approx(mad)


def test_threshold_counts_the_uniform_level_as_activated_within_tolerance():
    # N=4: N*a = 1 - 4e-8 is within the 1e-6 tolerance (activated); N*a = 0.9996 is not
    a = np.array([0.25 - 1e-8, 0.25 - 1e-8, 0.5 + 2e-8, 0.0])
    assert activated_instances(a).tolist() == [True, True, True, False]
    b = np.array([0.2499, 0.2499, 0.5002, 0.0])
    assert activated_instances(b).tolist() == [False, False, True, False]


def test_permutation_invariance_and_head_mean():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.full(50, 0.3), size=4)  # [heads, N]
    perm = rng.permutation(50)
    for fn in (attention_sparsity, gini, normalized_entropy, effective_instances, mass_fraction):
        assert fn(a) == pytest.approx(fn(a[:, perm]))
        assert fn(a) == pytest.approx(fn(a.mean(axis=0)))  # heads are averaged first
    assert attention_sparsity(torch.from_numpy(a)) == attention_sparsity(a)


def test_cohort_mean_over_all_and_positive_slides():
    uniform = np.full(4, 0.25)
    one_hot = np.array([1.0, 0, 0, 0])
    table = cohort_sparsity([uniform, one_hot, one_hot], slide_labels=[0, 1, 1], slide_ids=["a", "b", "c"])
    assert list(table["slide_id"]) == ["a", "b", "c"]
    summary = summarize_sparsity(table)
    assert summary["sparsity_all"] == pytest.approx((0 + 75 + 75) / 3)
    assert summary["sparsity_pos"] == pytest.approx(75.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="sum to 1"):
        attention_sparsity(np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"\[N\] or \[heads, N\]"):
        attention_sparsity(np.ones((2, 2, 2)) / 2)
    with pytest.raises(ValueError, match="negative"):
        attention_sparsity(np.array([1.5, -0.5]))
