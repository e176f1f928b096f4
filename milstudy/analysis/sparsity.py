"""Attention sparsity: the ABMILX paper's "proportion of activated patches" and companion concentration measures.

Paper: Tang, Qin et al. (ABMILX), Sec. 3.3 table "Sparsity" on CAMELYON. The paper does not define an activated
patch; **our operationalisation** (spec abmilx §4.2, pitfall 14): with the head-mean post-softmax attention ā,

    act_i = 1[N ā_i ≥ 1 - 1e-6]      (attention at least the uniform level 1/N)
    Sparsity = 100 (1 - mean_i act_i)  (percent; uniform attention -> 0, one-hot -> 100 (1 - 1/N))

Companions (ours): the fraction of patches holding 90 % of the mass, the normalised entropy H(ā)/log N, the
effective number of instances (1/Σā² and exp H), the top-k mass and the Gini coefficient of ā.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis._arrays import head_mean_attention

ACTIVATION_TOLERANCE = 1e-6


def activated_instances(attention: Any) -> np.ndarray:
    """Bool ``[N]``: instance i is activated if N·ā_i ≥ 1 - 1e-6 (our threshold). attention: ``[N]`` or ``[heads, N]``."""
    a = head_mean_attention(attention)
    return a.shape[0] * a >= 1.0 - ACTIVATION_TOLERANCE


def attention_sparsity(attention: Any) -> float:
    """Sparsity in percent, 100·(1 - share of activated instances) (spec §4.2). attention: ``[N]`` or ``[heads, N]``."""
    return float(100.0 * (1.0 - activated_instances(attention).mean()))


def mass_fraction(attention: Any, mass: float = 0.9) -> float:
    """Smallest fraction of instances whose (largest) attention sums to at least ``mass`` of ā. ``[N]``/``[heads, N]``."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    a = np.sort(head_mean_attention(attention))[::-1]
    cumulative = np.cumsum(a)
    count = int(np.searchsorted(cumulative, mass * cumulative[-1] - 1e-12) + 1)
    return min(count, a.shape[0]) / a.shape[0]


def normalized_entropy(attention: Any) -> float:
    """H(ā)/log N in [0, 1] (1 = uniform, 0 = one-hot); 0 for N = 1. attention: ``[N]`` or ``[heads, N]``."""
    a = head_mean_attention(attention)
    if a.shape[0] == 1:
        return 0.0
    return float(_entropy(a) / np.log(a.shape[0]))


def effective_instances(attention: Any, kind: str = "inverse_simpson") -> float:
    """Effective number of attended instances: ``inverse_simpson`` 1/Σā² or ``entropy`` exp H(ā). In [1, N]."""
    a = head_mean_attention(attention)
    if kind == "inverse_simpson":
        return float(1.0 / np.sum(a**2))
    if kind == "entropy":
        return float(np.exp(_entropy(a)))
    raise ValueError(f"kind must be 'inverse_simpson' or 'entropy', got {kind!r}")


def top_k_mass(attention: Any, k: int) -> float:
    """Attention mass of the k highest-attended instances of ā (k is clipped to N)."""
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    a = np.sort(head_mean_attention(attention))[::-1]
    return float(a[:k].sum())


def gini(attention: Any) -> float:
    """Gini coefficient of ā: 0 for uniform attention, (N-1)/N for one-hot. attention: ``[N]`` or ``[heads, N]``."""
    a = np.sort(head_mean_attention(attention))
    n = a.shape[0]
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * a) / (n * a.sum()) - (n + 1.0) / n)


def sparsity_summary(attention: Any, top_k: int = 10) -> dict[str, float]:
    """Every sparsity measure of one slide as a dict (keys are the column names of :func:`cohort_sparsity`)."""
    a = head_mean_attention(attention)
    return {
        "n_instances": a.shape[0],
        "sparsity": attention_sparsity(a),
        "mass90_fraction": mass_fraction(a, 0.9),
        "normalized_entropy": normalized_entropy(a),
        "effective_n": effective_instances(a, "inverse_simpson"),
        "effective_n_entropy": effective_instances(a, "entropy"),
        f"top{top_k}_mass": top_k_mass(a, top_k),
        "gini": gini(a),
    }


def cohort_sparsity(
    attentions: Sequence[Any],
    slide_labels: Sequence[int] | None = None,
    slide_ids: Sequence[str] | None = None,
    top_k: int = 10,
) -> pd.DataFrame:
    """Per-slide sparsity table: one row per slide (``attentions[i]``: ``[N_i]`` or ``[heads, N_i]``).

    Columns: slide_id, label (if given), and the keys of :func:`sparsity_summary`. Average it with
    :func:`summarize_sparsity` (all slides and positives only, as the spec asks).
    """
    if slide_labels is not None and len(slide_labels) != len(attentions):
        raise ValueError(f"slide_labels has {len(slide_labels)} entries for {len(attentions)} attention vectors")
    rows = []
    for i, attention in enumerate(attentions):
        row: dict[str, Any] = {"slide_id": slide_ids[i] if slide_ids is not None else str(i)}
        if slide_labels is not None:
            row["label"] = int(slide_labels[i])
        row.update(sparsity_summary(attention, top_k=top_k))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_sparsity(table: pd.DataFrame) -> dict[str, float]:
    """Mean sparsity over all slides and over positive slides (label > 0) of a :func:`cohort_sparsity` table."""
    out = {"sparsity_all": float(table["sparsity"].mean())}
    if "label" in table:
        positives = table[table["label"] > 0]
        out["sparsity_pos"] = float(positives["sparsity"].mean()) if len(positives) else float("nan")
    for column in ("normalized_entropy", "gini", "mass90_fraction", "effective_n"):
        out[column] = float(table[column].mean())
    return out


def _entropy(a: np.ndarray) -> float:
    nz = a[a > 0]
    return float(-np.sum(nz * np.log(nz)))
