"""The motif world (milstudy.data.synthetic.motif_bags): determinism, geometry, the motif as the label, and that
neither length nor instance marginals predict the label (specs/longmil.md §4.3; issue 13)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial import cKDTree
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from milstudy.data.synthetic.motif_bags import (STRIDE, TYPE_A, TYPE_B, MotifWorld, draw_lengths, motif_cohort,
                                                motif_tiles)

SMALL = MotifWorld(n_bags=60, length_knots=((0.0, 200), (0.6, 400), (1.0, 900)))


@pytest.fixture(scope="module")
def cohort():
    return motif_cohort(SMALL)


def test_same_seed_same_bags_other_seed_other_bags(cohort):
    again, other = motif_cohort(SMALL), motif_cohort(replace(SMALL, seed=1))
    for a, b in zip(cohort.bags, again.bags):
        assert a.slide_id == b.slide_id and a.target == b.target
        assert np.array_equal(a.features.numpy(), b.features.numpy()) and np.array_equal(a.coords, b.coords)
    assert not np.array_equal(cohort.bags[0].features[:20].numpy(), other.bags[0].features[:20].numpy())
    assert SMALL.digest() == again.world.digest() != other.world.digest()


def test_geometry_coordinates_are_level0_multiples_of_the_stride(cohort):
    for bag in cohort.bags:
        coords = bag.coords.numpy()
        assert coords.dtype == np.int64 and np.all(coords % STRIDE == 0) and coords.min() == 0
        assert len(np.unique(coords, axis=0)) == len(bag)
        assert bag.features.shape == (len(bag), SMALL.dim) and bag.features.dtype.is_floating_point


def test_lengths_follow_the_knots_at_stratified_quantiles():
    world = MotifWorld(n_bags=200)
    lengths = draw_lengths(world, np.random.default_rng(0))
    assert np.all(np.diff(lengths) >= 0) and lengths.min() >= 200 and lengths.max() <= 5000
    assert lengths[119] <= 500 < lengths[121] and lengths[159] <= 1500 < lengths[161]
    assert lengths[-1] > 4000  # the largest bags reach about 10 times the training lengths


def test_label_is_the_motif_and_negatives_keep_a_and_b_apart(cohort):
    for bag in cohort.bags:
        kind, cells = cohort.kinds[bag.slide_id], bag.coords.numpy() // STRIDE
        motif = bag.instance_labels.numpy().astype(bool)
        assert np.array_equal(motif, motif_tiles(cells, kind, SMALL.contact_distance))
        nearest, _ = cKDTree(cells[kind == TYPE_B]).query(cells[kind == TYPE_A], k=1)
        if bag.target == 1:
            assert motif.sum() >= 2 and nearest.min() <= SMALL.contact_distance
        else:
            assert not motif.any() and nearest.min() > SMALL.gap


def test_type_counts_are_the_same_function_of_length_in_both_classes(cohort):
    table = cohort.table
    expected = np.maximum(2, np.round(SMALL.type_share * table["n_instances"])).astype(int)
    assert np.array_equal(table["n_a"], expected) and np.array_equal(table["n_b"], expected)


def test_length_alone_is_at_chance_and_every_length_bucket_is_half_positive():
    table = motif_cohort(replace(SMALL, n_bags=120)).table
    assert abs(roc_auc_score(table["target"], table["n_instances"]) - 0.5) < 0.1
    buckets = np.array_split(table.sort_values("n_instances")["target"].to_numpy(), 4)
    assert all(abs(b.mean() - 0.5) <= 0.1 for b in buckets)
    # the motif's share of the tiles does not grow or shrink with length (positives)
    positives = table[table["target"] == 1].sort_values("n_instances")
    short, long = np.array_split(positives["motif_tile_share"].to_numpy(), 2)
    assert abs(short.mean() - long.mean()) < 0.02


def _bag_mean_auc(world: MotifWorld) -> float:
    cohort = motif_cohort(world)
    x = np.stack([b.features.numpy().mean(0) for b in cohort.bags])
    y = cohort.table["target"].to_numpy()
    prob = cross_val_predict(LogisticRegression(max_iter=2000), x, y, cv=5, method="predict_proba")[:, 1]
    return roc_auc_score(y, prob)


def test_instance_marginals_do_not_predict_the_label_without_the_contact_cue():
    world = replace(SMALL, n_bags=120, contact_cue=0.0)
    assert abs(_bag_mean_auc(world) - 0.5) < 0.15  # mean pooling of single tiles sees nothing
    assert _bag_mean_auc(replace(world, contact_cue=3.0)) > 0.9  # the cue is the only single-tile trace


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="contact_distance < gap"):
        MotifWorld(contact_distance=5.0, gap=5.0)
    with pytest.raises(ValueError, match="n_bags"):
        MotifWorld(n_bags=7)
    with pytest.raises(ValueError, match="length_knots"):
        MotifWorld(length_knots=((0.0, 500), (1.0, 200)))
    with pytest.raises(ValueError, match="could not place"):
        motif_cohort(MotifWorld(n_bags=8, type_share=0.15, gap=30.0, length_knots=((0.0, 100), (1.0, 120))))
