"""Instance samplers for end-to-end MIL training (ABMILX spec §2.2; Tang, Qin et al., Eq. 2 + upstream code).

All samplers return *indices* into a slide's patch grid(s) and are deterministic given a ``numpy.random.Generator``.

- ``sample_multiscale`` (MRIS): two scales; with ratio ``r``, ``n_low = floor(s / r)`` and ``n_main = s - n_low``
  (spec pitfall 9: floor for the low scale, remainder to main, so the quotas always sum to ``s``); ``r = inf`` is
  single scale. Within a scale: shuffle, take the first ``n`` (without replacement); all patches if fewer.
- ``sample_random``: single-scale uniform random without replacement.
- ``sample_regional``: a ``g x g`` grid on the real (x, y) coordinates (``N = g^2`` regions, our choice per spec
  §2.2); every non-empty cell gives ``floor(s / g^2)`` patches (all of them if fewer), the remainder is topped up at
  random from the patches not yet taken.
- ``topk_by_head_vote``: attention sampling (spec §2.2): given attention ``[heads, N]`` from an EMA model, each head
  votes for its top-``s`` patches; patches are ranked by votes, ties by mean attention, and the first ``s`` taken.

Repeat rule for small slides (spec §2.2, "pad by random repetition"): a slide with fewer patches than ``s`` gives
all its patches; if ``pad_to`` is set (the E2E trainer sets it to ``s`` whenever a batch holds several slides, so the
batch is one ``[B * s]`` tensor) the shortfall is filled by drawing *with replacement* from the patches already
taken, uniformly at random, each scale up to its own quota from its own patches (as upstream pads each scale).
Repeated patches are augmented independently. ``sample_regional_multiscale`` composes regional sampling of the
main scale with the MRIS low scale. A slide with no patches at all is an error naming the slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ScaleSample:
    """Indices of sampled patches per scale: ``main`` into the main grid, ``low`` into the low-scale grid."""

    main: np.ndarray
    low: np.ndarray

    def __len__(self) -> int:
        return len(self.main) + len(self.low)


def mris_quota(s: int, ratio: float) -> tuple[int, int]:
    """MRIS quotas ``(n_main, n_low)`` with ``n_low = floor(s / ratio)``, ``n_main = s - n_low``; ``ratio=inf``: single scale."""
    if s < 1:
        raise ValueError(f"sample size s must be >= 1, got {s}")
    if not ratio >= 1:
        raise ValueError(f"multi-scale ratio r must be >= 1 (or inf for single scale), got {ratio}")
    n_low = 0 if math.isinf(ratio) else int(math.floor(s / ratio))
    return s - n_low, n_low


def _take(n_available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle ``range(n_available)`` and take the first ``min(n, n_available)`` (no replacement)."""
    return rng.permutation(n_available)[: min(n, n_available)].astype(np.int64)


def pad_by_repetition(indices: np.ndarray, target: int, rng: np.random.Generator, what: str = "slide") -> np.ndarray:
    """Fill ``indices`` up to ``target`` by uniform draws with replacement from ``indices`` (the repeat rule)."""
    if len(indices) == 0:
        raise ValueError(f"{what} has no patches to sample from; check its tissue mask / tiling")
    if len(indices) >= target:
        return indices
    extra = rng.choice(indices, size=target - len(indices), replace=True)
    return np.concatenate([indices, extra]).astype(np.int64)


def sample_random(n_patches: int, s: int, rng: np.random.Generator, pad_to: int | None = None,
                  what: str = "slide") -> np.ndarray:
    """Single-scale random sampling: ``int64[min(s, n)]`` distinct indices (``[pad_to]`` with the repeat rule)."""
    if n_patches <= 0:
        raise ValueError(f"{what} has no patches to sample from; check its tissue mask / tiling")
    picked = _take(n_patches, s, rng)
    return pad_by_repetition(picked, pad_to, rng, what) if pad_to else picked


def sample_multiscale(n_main: int, n_low: int, s: int, ratio: float, rng: np.random.Generator,
                      pad_to: int | None = None, what: str = "slide") -> ScaleSample:
    """MRIS (spec §2.2): independent uniform sampling of ``floor(s/r)`` low-scale and ``s - floor(s/r)`` main patches.

    ``n_main``/``n_low``: numbers of patches available per scale. With ``pad_to`` each scale is padded to its own
    quota by the repeat rule (as upstream pads each scale separately), so the total reaches ``pad_to``.
    """
    if n_main + n_low <= 0:
        raise ValueError(f"{what} has no patches at any scale; check its tissue mask / tiling")
    quota_main, quota_low = mris_quota(s, ratio)
    if quota_low and n_low <= 0:
        raise ValueError(f"{what}: MRIS ratio r={ratio} needs low-scale patches but the low-scale grid is empty; "
                         "set ratio=inf (single scale) or tile the low scale")
    main = _take(n_main, quota_main, rng) if n_main > 0 else np.zeros(0, np.int64)
    low = _take(n_low, quota_low, rng) if quota_low else np.zeros(0, np.int64)
    if pad_to:
        main, low = _pad_per_scale(main, low, pad_to, quota_main, quota_low, rng, what)
    return ScaleSample(main.astype(np.int64), low.astype(np.int64))


def _pad_per_scale(main: np.ndarray, low: np.ndarray, pad_to: int, quota_main: int, quota_low: int,
                   rng: np.random.Generator, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Repeat rule per scale: each scale to its quota (scaled to ``pad_to``) from its own taken patches; a scale with
    no patches leaves its share to the other."""
    want_low = quota_low * pad_to // max(1, quota_main + quota_low) if len(low) else 0
    want_main = pad_to - want_low if len(main) else 0
    if not len(main):
        want_low = pad_to
    if len(main) < want_main:
        main = pad_by_repetition(main, want_main, rng, what)
    if len(low) < want_low:
        low = pad_by_repetition(low, want_low, rng, what)
    return main, low


def sample_regional_multiscale(coords: np.ndarray, n_low: int, s: int, ratio: float, grid: int,
                               rng: np.random.Generator, pad_to: int | None = None, what: str = "slide") -> ScaleSample:
    """Regional sampling of the main scale composed with the MRIS low scale (Table 7f compares the sampling strategy
    only): the MRIS quotas (``floor(s/r)`` low, the rest main), the main quota by :func:`sample_regional`, the low
    quota uniformly at random; ``ratio = inf`` is single-scale regional sampling."""
    quota_main, quota_low = mris_quota(s, ratio)
    if quota_low and n_low <= 0:
        raise ValueError(f"{what}: ratio r={ratio} needs low-scale patches but the low-scale grid is empty; "
                         "set ratio=inf (single scale) or tile the low scale")
    main = sample_regional(coords, quota_main, grid, rng, None, what)
    low = _take(n_low, quota_low, rng) if quota_low else np.zeros(0, np.int64)
    if pad_to:
        main, low = _pad_per_scale(main, low, pad_to, quota_main, quota_low, rng, what)
    return ScaleSample(main.astype(np.int64), low.astype(np.int64))


def region_cells(coords: np.ndarray, grid: int) -> np.ndarray:
    """Cell id ``int64[N]`` in ``[0, grid^2)`` of each patch on a ``grid x grid`` partition of its (x, y) extent."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2] (x, y), got shape {coords.shape}")
    low, high = coords.min(axis=0), coords.max(axis=0)
    span = np.maximum(high - low, 1e-9)
    cell_xy = np.minimum(((coords - low) / span * grid).astype(np.int64), grid - 1)
    return cell_xy[:, 1] * grid + cell_xy[:, 0]


def sample_regional(coords: np.ndarray, s: int, grid: int, rng: np.random.Generator, pad_to: int | None = None,
                    what: str = "slide") -> np.ndarray:
    """Regional random sampling (Table 7f): ``floor(s/g^2)`` per non-empty cell of a ``g x g`` grid, rest at random.

    ``coords``: ``[N, 2]`` patch coordinates. Returns ``int64[min(s, N)]`` distinct indices (``[pad_to]`` with the
    repeat rule).
    """
    n = len(coords)
    if n == 0:
        raise ValueError(f"{what} has no patches to sample from; check its tissue mask / tiling")
    if grid < 1:
        raise ValueError(f"regional sampling needs grid >= 1, got {grid}")
    cells = region_cells(coords, grid)
    per_cell = s // (grid * grid)
    taken: list[np.ndarray] = []
    for cell in np.unique(cells):
        members = np.flatnonzero(cells == cell)
        taken.append(members[_take(len(members), per_cell, rng)])
    chosen = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    if len(chosen) > s:  # more non-empty cells' quotas than s cannot happen (per_cell * cells <= s), kept for safety
        chosen = chosen[rng.permutation(len(chosen))[:s]]
    rest = np.setdiff1d(np.arange(n), chosen)
    top_up = rest[_take(len(rest), s - len(chosen), rng)]
    chosen = np.concatenate([chosen, top_up]).astype(np.int64)
    return pad_by_repetition(chosen, pad_to, rng, what) if pad_to else chosen


def topk_by_head_vote(attention: np.ndarray, s: int) -> np.ndarray:
    """Attention sampling: ``attention [heads, N]`` -> ``int64[min(s, N)]`` indices chosen by per-head top-s votes.

    Each head votes for its ``s`` highest-attention patches; patches are ranked by vote count, then by head-mean
    attention (deterministic, no randomness).
    """
    attention = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    heads, n = attention.shape
    k = min(s, n)
    votes = np.zeros(n)
    for head in range(heads):
        votes[np.argpartition(-attention[head], k - 1)[:k]] += 1
    order = np.lexsort((-attention.mean(axis=0), -votes))
    return order[:k].astype(np.int64)
