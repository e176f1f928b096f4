"""Optimisation risk of MIL attention in end-to-end training (ABMILX paper, Appendix A, Eqs. 6-12).

Definition 1 of the paper: R = O(max_{i∈N} â_i) with N the noisy instances. Our choices (spec abmilx §4.2):
O = identity, D = tumour patches, N = non-tumour patches of *positive* slides (slides with at least one tumour
patch; a negative slide has no discriminative instance to be distracted from).

- ``risk``: R = max_{i∈N} ā_i on the head-mean attention ā (for one head this is the paper's R_ABMIL), also
  reported as ``n_risk`` = N·R (1 = the uniform level).
- ``risk_mh``: R_MH = (1/m) Σ_j max_{i∈N} â^(j)_i (Eqs. 9, 12: each head moves 1/m of the bag feature Z).
- ``risk_max_head``: max_j max_{i∈N} â^(j)_i, the upper bound of Eq. 9 (R_MH ≤ it, equal for identical heads).
- ``mass_on_tumour``: Σ_{i∈D} ā_i; ``top1_is_noise``: whether argmax ā is a noise instance.
- ``head_correlation``: mean pairwise Pearson correlation of the head attentions (Eqs. 7-8; NaN for one head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis._arrays import as_head_attention, as_instance_labels


def multi_head_risk(attention: Any, noise: np.ndarray) -> float:
    """R_MH = (1/m) Σ_j max_{i∈noise} â^(j)_i. attention ``[heads, N]``; noise bool ``[N]`` (at least one True)."""
    a = as_head_attention(attention)
    return float(a[:, noise].max(axis=1).mean())


def head_correlation(attention: Any) -> float:
    """Mean pairwise Pearson correlation between the heads' attention vectors ``[heads, N]`` (NaN if heads < 2).

    A constant head (zero variance) has no defined correlation; such pairs are skipped.
    """
    a = as_head_attention(attention)
    if a.shape[0] < 2:
        return float("nan")
    centred = a - a.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    values = []
    for j in range(a.shape[0]):
        for k in range(j + 1, a.shape[0]):
            if norms[j] > 0 and norms[k] > 0:
                values.append(centred[j] @ centred[k] / (norms[j] * norms[k]))
    return float(np.mean(values)) if values else float("nan")


def mass_on_tumour(attention: Any, instance_labels: Any) -> float:
    """Σ_{i∈D} ā_i: the head-mean attention ``[N]`` / ``[heads, N]`` that falls on tumour instances (labels 1)."""
    a = as_head_attention(attention)
    return float(a.mean(axis=0)[as_instance_labels(instance_labels, a.shape[1])].sum())


def optimization_risk(attention: Any, instance_labels: Any) -> dict[str, float]:
    """All App. A risk measures of one positive slide.

    attention: ``[N]`` or ``[heads, N]`` post-softmax; instance_labels: ``[N]`` 0/1 (1 = tumour, the set D).
    Raises ValueError if the slide has no tumour or no noise instance (the risk is undefined there).
    """
    a = as_head_attention(attention)
    tumour = as_instance_labels(instance_labels, a.shape[1])
    if not tumour.any():
        raise ValueError("optimization risk needs a positive slide (at least one tumour instance); "
                         "filter slides with cohort_risk, which skips negatives")
    noise = ~tumour
    if not noise.any():
        raise ValueError("optimization risk needs at least one non-tumour (noise) instance")
    mean = a.mean(axis=0)
    risk = float(mean[noise].max())
    return {
        "n_instances": a.shape[1],
        "n_heads": a.shape[0],
        "witness_rate": float(tumour.mean()),
        "risk": risk,
        "n_risk": a.shape[1] * risk,
        "risk_mh": multi_head_risk(a, noise),
        "risk_max_head": float(a[:, noise].max()),
        "mass_on_tumour": mass_on_tumour(a, tumour),
        "top1_is_noise": bool(noise[int(np.argmax(mean))]),
        "head_correlation": head_correlation(a),
    }


def cohort_risk(
    attentions: Sequence[Any],
    instance_labels: Sequence[Any],
    slide_ids: Sequence[str] | None = None,
    epoch: int | None = None,
) -> pd.DataFrame:
    """Tidy per-slide risk table over the positive slides of a cohort (negatives and all-tumour slides skipped).

    attentions[i]: ``[N_i]`` or ``[heads, N_i]``; instance_labels[i]: ``[N_i]`` 0/1. Adds an ``epoch`` column when
    given, so that per-epoch tables concatenate into a training curve (:func:`risk_over_epochs`).
    """
    if len(attentions) != len(instance_labels):
        raise ValueError(f"{len(attentions)} attention vectors but {len(instance_labels)} instance-label arrays")
    rows = []
    for i, (attention, labels) in enumerate(zip(attentions, instance_labels)):
        if labels is None:
            continue
        y = np.asarray(labels).reshape(-1)
        if y.sum() == 0 or y.sum() == y.shape[0]:
            continue
        row: dict[str, Any] = {"slide_id": slide_ids[i] if slide_ids is not None else str(i)}
        if epoch is not None:
            row["epoch"] = int(epoch)
        row.update(optimization_risk(attention, y))
        rows.append(row)
    return pd.DataFrame(rows)


RISK_COLUMNS = ("risk", "n_risk", "risk_mh", "risk_max_head", "mass_on_tumour", "top1_is_noise", "head_correlation")


def risk_over_epochs(table: pd.DataFrame, by: Sequence[str] = ("epoch",)) -> pd.DataFrame:
    """Mean of every risk column per group (default per epoch) of concatenated :func:`cohort_risk` tables.

    ``top1_is_noise`` becomes the rate at which the top-1 patch is noise.
    """
    missing = [c for c in by if c not in table]
    if missing:
        raise ValueError(f"risk table has no column(s) {missing}; pass epoch= to cohort_risk")
    columns = [c for c in RISK_COLUMNS if c in table]
    numeric = table.assign(top1_is_noise=table["top1_is_noise"].astype(float)) if "top1_is_noise" in table else table
    return numeric.groupby(list(by), as_index=False)[columns].mean()
