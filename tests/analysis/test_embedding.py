"""Silhouette, kNN purity and a seeded UMAP on separated clusters (spec abmilx §4.3 E7)."""

import numpy as np
import pytest

from milstudy.analysis.embedding import embedding_quality, knn_purity, silhouette, umap_embedding


def _clusters(separation: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centre = separation * np.array([1.0, -1.0, 1.0, -1.0, 0.0])  # not a constant shift: correlation metric sees it
    x = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(0, 1, (40, 5)) + centre])
    return x, np.repeat([0, 1], 40)


def test_separated_clusters_are_pure_and_mixed_ones_are_not():
    x, y = _clusters(20.0)
    assert knn_purity(x, y, k=10) == 1.0
    assert silhouette(x, y) > 0.8
    mixed, y2 = _clusters(0.0)
    assert 0.3 < knn_purity(mixed, y2, k=10) < 0.7
    assert abs(silhouette(mixed, y2)) < 0.1


def test_hand_purity():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    y = np.array([0, 0, 1, 1])
    # k=1 neighbours: 0->1 (same), 1->0 or 2 (0 at equal distance; nearest index order -> 0, same), 2->1 (diff), 3->2 (same)
    assert knn_purity(x, y, k=1) == pytest.approx(3 / 4)
    assert np.isnan(silhouette(x, np.zeros(4)))
    # balanced: class 0 purity (1 + 1)/2 = 1, class 1 purity (0 + 1)/2 = 0.5 -> 0.75 (the same here by symmetry)
    assert knn_purity(x, y, k=1, balanced=True) == pytest.approx(0.75)


def test_balanced_purity_exposes_a_minority_class_that_is_ignored():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3))  # no structure at all
    y = (np.arange(100) < 5).astype(int)  # 5 % minority
    assert knn_purity(x, y, k=10) > 0.85
    assert knn_purity(x, y, k=10, balanced=True) < 0.6


@pytest.mark.slow  # umap-learn JIT-compiles with numba on first use: 20-60 s on a loaded 2-core machine
def test_umap_is_seeded_and_two_dimensional():
    x, y = _clusters(10.0)
    e1 = umap_embedding(x, seed=0)
    e2 = umap_embedding(x, seed=0)
    assert e1.shape == (80, 2)
    np.testing.assert_allclose(e1, e2)
    # separated clusters stay separated (euclidean: with the default correlation metric the noise-only cluster has
    # no correlation structure, and its purity sits at 0.95 +- a few points depending on the umap/numba release)
    assert embedding_quality(umap_embedding(x, seed=0, metric="euclidean"), y)["knn10_purity"] > 0.95
    assert embedding_quality(e1, y)["knn10_purity"] > 0.85


def test_bad_input():
    with pytest.raises(ValueError, match="labels has 3"):
        knn_purity(np.zeros((4, 2)), np.zeros(3))


def test_compare_feature_sets_scores_raw_features():
    from milstudy.analysis.embedding import compare_feature_sets

    good, y = _clusters(20.0)
    bad, _ = _clusters(0.0)
    embeddings, table = compare_feature_sets({"good": (good, y), "bad": (bad, y)}, projection="pca", k=5)
    assert embeddings["good"].shape == (80, 2)
    scores = table.set_index("setting")
    assert scores.loc["good", "knn5_purity"] > scores.loc["bad", "knn5_purity"]
    with pytest.raises(ValueError, match="projection"):
        compare_feature_sets({"good": (good, y)}, projection="tsne")
