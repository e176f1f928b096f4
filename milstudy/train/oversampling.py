"""Class-balanced oversampling of training bags (specs/abmilx.md §2.6: BRCA ILC oversampled to IDC:ILC ≈ 2:1).

Upstream ABMILX oversamples by duplicating manifest rows once before training; ``oversample_indices`` does the same
on dataset indices: every class with fewer than ``max_count / ratio`` bags is topped up to ``ceil(max_count / ratio)``
by whole copies of its bags plus a seeded random subset without replacement for the remainder. ``ratio=2`` gives
majority:minority ≈ 2:1, ``ratio=1`` a fully balanced set. Classes that are already large enough are untouched.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def oversample_indices(labels: Sequence[int], ratio: float = 1.0, seed: int = 0) -> np.ndarray:
    """Dataset indices ``int64[M]`` (each original index at least once) with minority classes duplicated.

    labels: class index of each training bag; ratio: target majority:minority ratio (>= 1); seed: for the remainder.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("oversample_indices: labels must be a non-empty 1-D array of class indices")
    if not ratio >= 1.0:
        raise ValueError(f"oversample_indices: ratio (majority:minority) must be >= 1, got {ratio}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = math.ceil(counts.max() / ratio)
    parts = [np.arange(len(labels))]
    for cls, count in zip(classes, counts):
        if count >= target:
            continue
        members = np.flatnonzero(labels == cls)
        missing = target - count
        copies, remainder = divmod(missing, count)
        parts.extend([members] * copies)
        parts.append(rng.choice(members, size=remainder, replace=False))
    return np.concatenate(parts).astype(np.int64)
