"""Instance samplers (ABMILX spec §2.2, invariant §6.13): quotas, no duplicates, regions, repeat rule, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from milstudy.data.instance_sampling import (
    mris_quota,
    region_cells,
    sample_multiscale,
    sample_random,
    sample_regional,
    topk_by_head_vote,
)


@pytest.mark.parametrize(("s", "r", "n_low"), [(768, 10, 76), (512, 4, 128), (128, 3, 42), (64, 6, 10), (7, 2, 3)])
def test_mris_quotas_floor_low_remainder_main(s, r, n_low):
    n_main, low = mris_quota(s, r)
    assert low == n_low == math.floor(s / r) and n_main + low == s


def test_mris_counts_per_scale_and_no_duplicates():
    rng = np.random.default_rng(0)
    sample = sample_multiscale(n_main=500, n_low=200, s=128, ratio=4, rng=rng)
    assert len(sample.low) == 32 and len(sample.main) == 96
    assert len(np.unique(sample.main)) == 96 and len(np.unique(sample.low)) == 32
    assert sample.main.max() < 500 and sample.low.max() < 200


def test_mris_infinite_ratio_is_single_scale():
    sample = sample_multiscale(300, 100, 64, math.inf, np.random.default_rng(1))
    assert len(sample.low) == 0 and len(sample.main) == 64
    # no low grid at all is fine for r = inf, an error otherwise
    assert len(sample_multiscale(300, 0, 64, math.inf, np.random.default_rng(1))) == 64
    with pytest.raises(ValueError, match="low-scale grid is empty"):
        sample_multiscale(300, 0, 64, 4, np.random.default_rng(1), what="slide_007")


def test_samplers_deterministic_given_generator():
    a = sample_multiscale(400, 100, 64, 4, np.random.default_rng(5))
    b = sample_multiscale(400, 100, 64, 4, np.random.default_rng(5))
    c = sample_multiscale(400, 100, 64, 4, np.random.default_rng(6))
    assert np.array_equal(a.main, b.main) and np.array_equal(a.low, b.low)
    assert not np.array_equal(a.main, c.main)
    coords = np.random.default_rng(0).integers(0, 1000, size=(300, 2))
    assert np.array_equal(sample_regional(coords, 40, 2, np.random.default_rng(3)),
                          sample_regional(coords, 40, 2, np.random.default_rng(3)))


def test_small_slide_takes_all_then_repeat_rule_pads():
    rng = np.random.default_rng(0)
    few = sample_random(10, 64, rng)
    assert sorted(few.tolist()) == list(range(10))
    padded = sample_random(10, 64, np.random.default_rng(0), pad_to=64)
    assert len(padded) == 64 and set(padded.tolist()) == set(range(10))
    ms = sample_multiscale(20, 5, 64, 4, np.random.default_rng(2), pad_to=64)
    assert len(ms) == 64 and set(ms.main.tolist()) == set(range(20)) and set(ms.low.tolist()) == set(range(5))
    assert len(sample_multiscale(20, 5, 64, 4, np.random.default_rng(2))) == 25  # batch 1: no padding
    with pytest.raises(ValueError, match="slide_x has no patches"):
        sample_random(0, 8, rng, what="slide_x")


def test_regional_covers_every_nonempty_cell():
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.integers(0, 100, (200, 2)), rng.integers(900, 1000, (15, 2)),
                             np.array([[0, 990], [10, 980]])])  # corner cells: dense, sparse, tiny
    for grid in (2, 3, 4):
        s = 64
        chosen = sample_regional(coords, s, grid, np.random.default_rng(grid))
        assert len(chosen) == s and len(np.unique(chosen)) == s
        cells = region_cells(coords, grid)
        for cell in np.unique(cells):
            available = int((cells == cell).sum())
            got = int((cells[chosen] == cell).sum())
            assert got >= min(s // grid**2, available), (grid, cell, got)


def test_region_cells_uses_real_xy():
    coords = np.array([[0, 0], [99, 0], [0, 99], [99, 99]])
    assert region_cells(coords, 2).tolist() == [0, 1, 2, 3]


def test_topk_head_vote():
    attention = np.array([[0.5, 0.3, 0.1, 0.1, 0.0], [0.1, 0.2, 0.6, 0.05, 0.05]])
    # top-2 per head: {0, 1} and {2, 1}; patch 1 has two votes, then 2 (mean 0.35) beats 0 (mean 0.30)
    assert topk_by_head_vote(attention, 2).tolist() == [1, 2]
    assert sorted(topk_by_head_vote(attention, 3).tolist()) == [0, 1, 2]
    assert len(topk_by_head_vote(attention, 10)) == 5


def test_mris_padding_fills_each_scale_to_its_own_quota():
    # s = 64, r = 4: quotas 48 main + 16 low. 20 main and 5 low patches exist: each scale repeats its own patches
    ms = sample_multiscale(20, 5, 64, 4, np.random.default_rng(2), pad_to=64)
    assert (len(ms.main), len(ms.low)) == (48, 16)
    # a scale that already fills its quota is not padded; only the short one repeats
    ms = sample_multiscale(400, 5, 64, 4, np.random.default_rng(3), pad_to=64)
    assert (len(ms.main), len(np.unique(ms.main)), len(ms.low), len(np.unique(ms.low))) == (48, 48, 16, 5)
    # an empty low scale is refused, not silently replaced by main patches
    with pytest.raises(ValueError, match="low-scale grid is empty"):
        sample_multiscale(20, 0, 64, 4, np.random.default_rng(2), pad_to=64)
