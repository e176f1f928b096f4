"""Instance-feature geometry before and after end-to-end training (ABMILX paper Sec. 4.4 / Fig. 6; spec §4.3 E7).

The paper shows UMAPs of one PANDA slide's patch features (umap-learn, ``n_neighbors=5``, ``min_dist=0.1``,
``metric='correlation'``, upstream) coloured by label. We add two numbers the paper does not report (ours):
the silhouette score of the ground-truth classes and the 10-nearest-neighbour label purity, both on the raw
features (not on the 2-D UMAP, which distorts distances).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from milstudy.analysis._arrays import to_numpy


def _check_features(features: Any, labels: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    x = to_numpy(features)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if labels is None:
        return x, None
    y = to_numpy(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries for {x.shape[0]} feature rows")
    return x, y


def umap_embedding(
    features: Any, n_neighbors: int = 5, min_dist: float = 0.1, metric: str = "correlation", seed: int = 0
) -> np.ndarray:
    """2-D UMAP of instance features ``[N, D] -> [N, 2]`` (defaults: the upstream figure's parameters), seeded."""
    import umap  # imported here: umap-learn compiles with numba on first import, a few seconds

    x, _ = _check_features(features)
    if x.shape[0] <= n_neighbors + 1:
        raise ValueError(f"UMAP needs more than n_neighbors+1={n_neighbors + 1} points, got {x.shape[0]}")
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x).astype(np.float32)


def silhouette(features: Any, labels: Any, metric: str = "euclidean", max_points: int = 5000, seed: int = 0) -> float:
    """Silhouette score of the ground-truth classes in feature space ``[N, D]`` (NaN with fewer than 2 classes).

    Subsamples to ``max_points`` (seeded) because the score is O(N²).
    """
    x, y = _check_features(features, labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    if x.shape[0] > max_points:
        keep = np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False)
        x, y = x[keep], y[keep]
    return float(silhouette_score(x, y, metric=metric))


def knn_purity(features: Any, labels: Any, k: int = 10, metric: str = "euclidean", balanced: bool = False) -> float:
    """Mean share of each point's k nearest neighbours (itself excluded) that carry its label. features ``[N, D]``.

    ``balanced``: average the per-class means instead (ours): with 4 % tumour patches the plain purity of a
    feature space that ignores tumour is still ≈ 0.96; the balanced one is ≈ 0.5.
    """
    x, y = _check_features(features, labels)
    if x.shape[0] <= k:
        raise ValueError(f"kNN purity with k={k} needs more than {k} points, got {x.shape[0]}")
    neighbours = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(x)
    _, index = neighbours.kneighbors(x)
    # drop the point itself (duplicates may put it in another column; drop exactly one self/duplicate per row)
    same = []
    for row, idx in enumerate(index):
        others = [j for j in idx if j != row][:k]
        same.append(np.mean(y[others] == y[row]))
    same = np.asarray(same)
    if balanced:
        return float(np.mean([same[y == c].mean() for c in np.unique(y)]))
    return float(same.mean())


def embedding_quality(features: Any, labels: Any, k: int = 10) -> dict[str, float]:
    """``silhouette``, ``knn_purity`` and its class-balanced version (k neighbours) of features ``[N, D]``."""
    return {"silhouette": silhouette(features, labels), f"knn{k}_purity": knn_purity(features, labels, k=k),
            f"knn{k}_purity_balanced": knn_purity(features, labels, k=k, balanced=True)}


def pca_embedding(features: Any, seed: int = 0) -> np.ndarray:
    """2-D PCA of instance features ``[N, D] -> [N, 2]`` (the fast stand-in for UMAP in smoke runs)."""
    from sklearn.decomposition import PCA

    x, _ = _check_features(features)
    return PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)


def compare_feature_sets(
    feature_sets: dict[str, tuple[Any, Any]],
    projection: str = "umap",
    k: int = 10,
    seed: int = 0,
    **umap_kwargs: Any,
) -> tuple[dict[str, np.ndarray], "pd.DataFrame"]:
    """Project and score several feature sets of the same instances (e.g. weak, strong, after E2E; spec §4.3 E7).

    feature_sets: ``{name: (features [N, D], labels [N])}``; projection: "umap" (seeded, :func:`umap_embedding`) or
    "pca". Returns (``{name: [N, 2]}``, a table with ``setting``, ``n``, ``silhouette`` and ``knn{k}_purity``
    computed on the raw features).
    """
    import pandas as pd

    if projection not in ("umap", "pca"):
        raise ValueError(f"projection must be 'umap' or 'pca', got {projection!r}")
    embeddings, rows = {}, []
    for name, (features, labels) in feature_sets.items():
        embeddings[name] = (umap_embedding(features, seed=seed, **umap_kwargs) if projection == "umap"
                            else pca_embedding(features, seed=seed))
        rows.append({"setting": name, "n": int(np.asarray(labels).shape[0]), **embedding_quality(features, labels, k)})
    return embeddings, pd.DataFrame(rows)
