"""Non-identifiability of attention from the bag feature (ASMIL App. I, Table 8; specs/asmil.md §4.3 S11, §6.12).

An attention-pooled bag feature is ``z = X^T a`` with ``a`` in the simplex. If ``[X, 1]`` (``[N, D + 1]``) has rank
below N, some ``v != 0`` has ``X^T v = 0`` and ``1^T v = 0``; then ``a' = a + t v`` (small t, ``a' >= 0``) is another
attention vector with the same bag feature, so the classifier cannot tell them apart and the loss does not pin the
attention down. This holds for every bag with ``N >= D + 2`` (the paper reports 96-99.8 % of real bags).

- ``affinely_dependent(X)``: rank([X, 1]) < N (numerical rank, SVD tolerance).
- ``null_direction(X)``: a unit ``v`` with ``X^T v = 0`` and ``1^T v = 0`` (the last right-singular vector of
  ``[X, 1]^T``), or None when there is none.
- ``equivalent_attention(a, X)``: ``(a', t)`` with ``a' != a`` in the simplex and ``X^T a' = X^T a``.
- ``dependence_share(bags)``: the share of bags that are affinely dependent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _augmented(features: Any) -> np.ndarray:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"features must be [N, D] with N >= 1, got shape {x.shape}")
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # [N, D + 1]


def _rank(matrix: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(matrix))


def affinely_dependent(features: Any) -> bool:
    """True when rank([X, 1]) < N: two attention vectors give the same bag feature."""
    aug = _augmented(features)
    return _rank(aug) < aug.shape[0]


def null_direction(features: Any) -> np.ndarray | None:
    """A unit vector ``v`` ``[N]`` with ``X^T v = 0`` and ``sum(v) = 0``, or None if ``[X, 1]`` has full row rank."""
    aug = _augmented(features)
    if _rank(aug) >= aug.shape[0]:
        return None
    _, _, vt = np.linalg.svd(aug.T, full_matrices=True)  # aug.T: [D + 1, N]; its null space is in the last rows
    return vt[-1]


def equivalent_attention(attention: Any, features: Any, fraction: float = 0.5) -> tuple[np.ndarray, float] | None:
    """``(a', t)``: ``a' = a + t v`` with ``t`` = ``fraction`` of the largest step that keeps ``a' >= 0`` (a must
    be strictly positive), so ``a'`` is in the simplex, differs from ``a`` and has the same bag feature."""
    a = np.asarray(attention, np.float64).reshape(-1)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if a.shape[0] != np.asarray(features).shape[0] or np.any(a <= 0) or abs(a.sum() - 1) > 1e-6:
        raise ValueError("attention must be a strictly positive distribution over the bag's N instances")
    v = null_direction(features)
    if v is None:
        return None
    negative = v < 0
    t_max = np.min(a[negative] / -v[negative]) if negative.any() else np.inf
    t = fraction * float(t_max)
    return a + t * v, t


def dependence_share(bags: Sequence[Any]) -> float:
    """The share of bags (``[N, D]`` arrays or objects with ``.features``) that are affinely dependent."""
    if not bags:
        raise ValueError("dependence_share: no bags")
    flags = [affinely_dependent(getattr(b, "features", b)) for b in bags]
    return float(np.mean(flags))
