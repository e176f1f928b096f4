"""Sampling label noise: how likely s randomly sampled patches of a positive slide contain no tumour patch at all.

End-to-end training (ABMILX, Sec. 3.1 / Eq. 2) trains on s random patches per slide and step, but keeps the
slide label: a positive slide whose sample misses every tumour patch becomes a mislabelled bag for that step.
The paper does not quantify this (users ask the authors about small lesions); this module does (ours):

- without replacement (the upstream sampler: shuffle, take the first s; all patches if N ≤ s), hypergeometric:
  P0 = C(N - T, s) / C(N, s) for N patches of which T are tumour, and 0 if s ≥ N and T > 0;
- with replacement (or an infinitely large slide) at witness rate w = T/N: P0 = (1 - w)^s;
- measured: Monte-Carlo draws from a sampler on real instance-label grids, compared with the closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

# sampler(n_instances, s, rng, n_draws) -> int index array [n_draws, s'] (s' = s, or n_instances if the slide is smaller)
Sampler = Callable[[int, int, np.random.Generator, int], np.ndarray]


def p_no_witness_without_replacement(n_instances: int, n_tumour: int, s: int) -> float:
    """P(no tumour patch among s drawn without replacement from N patches with T tumour); 0 if s ≥ N and T > 0."""
    if n_instances < 1 or not 0 <= n_tumour <= n_instances or s < 1:
        raise ValueError(f"need N ≥ 1, 0 ≤ T ≤ N and s ≥ 1; got N={n_instances}, T={n_tumour}, s={s}")
    if s >= n_instances:
        return float(n_tumour == 0)
    return float(hypergeom.pmf(0, n_instances, n_tumour, s))


def p_no_witness_with_replacement(witness_rate: float, s: int) -> float:
    """P(no tumour patch among s drawn with replacement) = (1 - w)^s for witness rate w in [0, 1]."""
    if not 0.0 <= witness_rate <= 1.0 or s < 1:
        raise ValueError(f"need witness_rate in [0, 1] and s ≥ 1; got {witness_rate}, {s}")
    return float((1.0 - witness_rate) ** s)


def no_witness_curve(witness_rates: Iterable[float], s_values: Iterable[int], n_instances: int) -> pd.DataFrame:
    """Closed-form P0 on a grid of witness rate × s for slides of ``n_instances`` patches (T = round(w N), ≥ 1).

    Columns: witness_rate, s, n_tumour, p_without_replacement, p_with_replacement.
    """
    rows = []
    for w in witness_rates:
        n_tumour = max(1, int(round(w * n_instances)))
        for s in s_values:
            rows.append({
                "witness_rate": float(w), "s": int(s), "n_tumour": n_tumour,
                "p_without_replacement": p_no_witness_without_replacement(n_instances, n_tumour, int(s)),
                "p_with_replacement": p_no_witness_with_replacement(n_tumour / n_instances, int(s)),
            })
    return pd.DataFrame(rows)


def uniform_sampler(replace: bool = False) -> Sampler:
    """The plain random sampler: s indices per draw, without replacement (all indices if N ≤ s) or with it."""

    def sample(n_instances: int, s: int, rng: np.random.Generator, n_draws: int) -> np.ndarray:
        if replace:
            return rng.integers(0, n_instances, size=(n_draws, s))
        if s >= n_instances:
            return np.tile(np.arange(n_instances), (n_draws, 1))
        keys = rng.random((n_draws, n_instances))
        return np.argpartition(keys, s - 1, axis=1)[:, :s]

    return sample


def mris_main_scale_sampler(ratio: float) -> Sampler:
    """The main-scale part of MRIS (``milstudy.data.instance_sampling.sample_multiscale``): s - floor(s/r) patches.

    Low-scale patches (2x field of view) are ignored here, so the measured P0 is an upper bound on MRIS label noise
    (a low-scale patch may show a lesion that no sampled main-scale patch covers).
    """
    from milstudy.data.instance_sampling import sample_multiscale

    def sample(n_instances: int, s: int, rng: np.random.Generator, n_draws: int) -> np.ndarray:
        n_low = 0 if np.isinf(ratio) else max(1, n_instances // 4)
        draws = [sample_multiscale(n_instances, n_low, s, ratio, rng).main for _ in range(n_draws)]
        return np.stack(draws)

    return sample


def measured_no_witness(
    instance_labels: Any, s: int, n_draws: int = 2000, sampler: Sampler | None = None, seed: int = 0
) -> float:
    """Monte-Carlo share of ``n_draws`` samples of s patches of one slide (labels ``[N]`` 0/1) with no tumour patch."""
    y = np.asarray(instance_labels).reshape(-1).astype(bool)
    sampler = sampler or uniform_sampler(replace=False)
    index = sampler(y.shape[0], int(s), np.random.default_rng(seed), int(n_draws))
    return float((~y[index].any(axis=1)).mean())


def cohort_no_witness(
    instance_labels: Sequence[Any],
    s_values: Iterable[int],
    n_draws: int = 2000,
    sampler: Sampler | None = None,
    replace: bool = False,
    slide_ids: Sequence[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Closed form vs measured P0 for every positive slide of a cohort and every s.

    instance_labels[i]: ``[N_i]`` 0/1 patch labels of slide i (negatives skipped). ``sampler`` defaults to the
    uniform sampler with/without replacement (``replace``); the closed form follows ``replace``.
    Columns: slide_id, n_instances, n_tumour, witness_rate, s, p_closed_form, p_measured.
    """
    sampler = sampler or uniform_sampler(replace=replace)
    s_values = [int(s) for s in s_values]
    rows = []
    for i, labels in enumerate(instance_labels):
        if labels is None:
            continue
        y = np.asarray(labels).reshape(-1).astype(bool)
        n, t = y.shape[0], int(y.sum())
        if t == 0:
            continue
        for j, s in enumerate(s_values):
            closed = p_no_witness_with_replacement(t / n, s) if replace else p_no_witness_without_replacement(n, t, s)
            rows.append({
                "slide_id": slide_ids[i] if slide_ids is not None else str(i),
                "n_instances": n, "n_tumour": t, "witness_rate": t / n, "s": s,
                "p_closed_form": closed,
                "p_measured": measured_no_witness(y, s, n_draws, sampler, seed=seed + 1000 * i + j),
            })
    return pd.DataFrame(rows)
