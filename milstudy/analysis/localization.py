"""Attention as a tumour detector: instance AUROC and top-k precision (not in the ABMILX paper; spec abmilx §4.2
"Localization", §4.3 E8).

On a positive slide, the head-mean attention ā ranks the patches; with instance ground truth we score that ranking
by the ROC-AUC against the patch labels and by the precision of the top-k patches, k = number of tumour patches
(our choice: then precision = recall, the R-precision of retrieval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from milstudy.analysis._arrays import as_instance_labels, head_mean_attention


def instance_auroc(attention: Any, instance_labels: Any) -> float:
    """ROC-AUC of ā ``[N]`` (from ``[N]`` or ``[heads, N]``) against 0/1 patch labels ``[N]``; NaN if one class only."""
    a = head_mean_attention(attention)
    y = as_instance_labels(instance_labels, a.shape[0])
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, a))


def top_k_precision(attention: Any, instance_labels: Any, k: int | None = None) -> float:
    """Share of tumour patches among the k most-attended; k defaults to the number of tumour patches.

    Ties at the k-th value are broken by index order (stable sort). NaN when the slide has no tumour patch.
    """
    a = head_mean_attention(attention)
    y = as_instance_labels(instance_labels, a.shape[0])
    k = int(y.sum()) if k is None else int(k)
    if k <= 0:
        return float("nan")
    top = np.argsort(-a, kind="stable")[:k]
    return float(y[top].mean())


def cohort_localization(
    attentions: Sequence[Any], instance_labels: Sequence[Any], slide_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per positive slide: ``instance_auroc`` and ``top_k_precision`` (slides without tumour patches skipped)."""
    if len(attentions) != len(instance_labels):
        raise ValueError(f"{len(attentions)} attention vectors but {len(instance_labels)} instance-label arrays")
    rows = []
    for i, (attention, labels) in enumerate(zip(attentions, instance_labels)):
        if labels is None or np.asarray(labels).sum() == 0:
            continue
        rows.append({
            "slide_id": slide_ids[i] if slide_ids is not None else str(i),
            "n_tumour": int(np.asarray(labels).sum()),
            "instance_auroc": instance_auroc(attention, labels),
            "top_k_precision": top_k_precision(attention, labels),
        })
    return pd.DataFrame(rows)
