"""Rank and sparsity of an attention matrix, every definition side by side (LongMIL, Li et al. NeurIPS 2024,
§3.2 and Fig. 2; spec ``shared/specs/longmil.md`` §4.1, pitfall §3.8 "rank is definition-dependent").

For ``A [n, n]`` with singular values σ_1 ≥ ... ≥ σ_n (float64 SVD):

- ``numerical_rank``: #{σ_i > σ_1 · n · ε_float64} (the ``numpy.linalg.matrix_rank`` default);
- ``relative_rank(δ)``: #{σ_i > δ σ_1}, δ ∈ {1e-2, 1e-3} by default;
- ``effective_rank`` (Roy & Vetterli 2007): exp(-Σ p_i log p_i), p_i = σ_i / Σ σ_j; 1 ≤ erank ≤ rank;
- ``stable_rank``: ||A||_F² / ||A||_2² = Σ σ_i² / σ_1²; 1 ≤ srank ≤ rank;
- ``logit rank``: the numerical rank of the logits QKᵀ (≤ d_h, paper Eqs. 6-7), when the logits are given;
- ``attention_sparsity_ratio`` (paper Eqs. 8-9): r = 1 - |{(i, j): A_ij > τ}| / n², τ = 1e-4 / n.

:func:`rank_measures` returns all of them for one matrix; :func:`rank_table` one tidy row per matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis._arrays import to_numpy

DEFAULT_DELTAS = (1e-2, 1e-3)
SPARSITY_TAU = 1e-4  # tau = SPARSITY_TAU / n (paper, after Eq. 8)


def _matrix(a: Any, name: str = "attention") -> np.ndarray:
    m = to_numpy(a)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix [n, m]; got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contains NaN or inf")
    return m


def singular_values(a: Any) -> np.ndarray:
    """Singular values ``[min(n, m)]`` of ``a [n, m]`` in float64, descending."""
    return np.linalg.svd(_matrix(a), compute_uv=False)


def numerical_rank(a: Any, sv: np.ndarray | None = None) -> int:
    """#{σ_i > σ_1 · max(n, m) · ε_float64}: the default tolerance of ``numpy.linalg.matrix_rank``."""
    m = _matrix(a)
    s = singular_values(m) if sv is None else sv
    return int(np.sum(s > s[0] * max(m.shape) * np.finfo(np.float64).eps)) if s[0] > 0 else 0


def relative_rank(a: Any, delta: float, sv: np.ndarray | None = None) -> int:
    """#{σ_i > δ σ_1} for a relative threshold 0 < δ < 1 (spec §4.1)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1); got {delta!r}")
    s = singular_values(a) if sv is None else sv
    return int(np.sum(s > delta * s[0])) if s[0] > 0 else 0


def effective_rank(a: Any, sv: np.ndarray | None = None) -> float:
    """Roy-Vetterli entropy effective rank exp(-Σ p_i log p_i), p = σ / Σσ; in [1, rank] (0 for A = 0)."""
    s = singular_values(a) if sv is None else sv
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(a: Any, sv: np.ndarray | None = None) -> float:
    """||A||_F² / ||A||_2² = Σσ² / σ_1²; in [1, rank] (0 for A = 0)."""
    s = singular_values(a) if sv is None else sv
    return float(np.sum(s**2) / s[0] ** 2) if s[0] > 0 else 0.0


def attention_sparsity_ratio(a: Any, tau: float | None = None) -> float:
    """Paper Eqs. 8-9: 1 - |{(i, j): A_ij > τ}| / n² for a square attention matrix, τ = 1e-4 / n by default
    (uniform attention -> 0, the identity -> 1 - 1/n)."""
    m = _matrix(a)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"attention must be square [n, n] for the Eq. 9 sparsity; got {m.shape}")
    n = m.shape[0]
    threshold = SPARSITY_TAU / n if tau is None else tau
    return float(1.0 - np.count_nonzero(m > threshold) / n**2)


def rank_measures(attention: Any, logits: Any | None = None,
                  deltas: Sequence[float] = DEFAULT_DELTAS) -> dict[str, float]:
    """Every measure of the module docstring for one matrix ``[n, n]`` (one SVD); ``logits [n, n]`` (QKᵀ,
    optional) adds ``logit_rank``. Keys: n, numerical_rank, rank_rel_<δ>, effective_rank, stable_rank,
    logit_rank, sparsity, and the same ranks divided by n (``*_frac``)."""
    a = _matrix(attention)
    sv = singular_values(a)
    n = a.shape[0]
    row: dict[str, float] = {"n": n, "numerical_rank": numerical_rank(a, sv)}
    for delta in deltas:
        row[f"rank_rel_{delta:g}"] = relative_rank(a, delta, sv)
    row["effective_rank"] = effective_rank(a, sv)
    row["stable_rank"] = stable_rank(a, sv)
    row["logit_rank"] = float("nan") if logits is None else numerical_rank(_matrix(logits, "logits"))
    row["sparsity"] = attention_sparsity_ratio(a) if a.shape[0] == a.shape[1] else float("nan")
    for key in ("numerical_rank", *(f"rank_rel_{d:g}" for d in deltas), "effective_rank", "stable_rank"):
        row[f"{key}_frac"] = row[key] / n
    return row


def rank_table(matrices: Iterable[Mapping[str, Any]], deltas: Sequence[float] = DEFAULT_DELTAS) -> pd.DataFrame:
    """One tidy row per matrix: each item is a mapping with ``attention`` (``[n, n]``), optional ``logits`` and any
    label columns (kind, temperature, seed, ...), which are copied into the row beside :func:`rank_measures`."""
    rows = []
    for item in matrices:
        if "attention" not in item:
            raise ValueError(f"each item needs an 'attention' matrix; got keys {sorted(item)}")
        labels = {k: v for k, v in item.items() if k not in ("attention", "logits")}
        rows.append({**labels, **rank_measures(item["attention"], item.get("logits"), deltas)})
    if not rows:
        raise ValueError("matrices is empty; pass at least one {'attention': A, ...}")
    return pd.DataFrame(rows)
