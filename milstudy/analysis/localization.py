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


# ------------------------------------------------------------------ ASMIL localization (specs/asmil.md §4.2)
def rescaled_scores(scores: Any) -> np.ndarray:
    """Per-slide min-max rescaling of tile scores ``[N]`` (or ``[heads, N]``: head mean) to [0, 1]; any read-out,
    not only a distribution; a constant slide gives zeros."""
    a = np.asarray(scores, np.float64)
    a = a.mean(0) if a.ndim == 2 else a.reshape(-1)
    span = a.max() - a.min()
    return np.zeros_like(a) if span <= 0 else (a - a.min()) / span


def lesions(coords: Any, instance_labels: Any, stride: float | None = None) -> np.ndarray:
    """Connected components (4-neighbour on the patch grid) of the tumour tiles: ``[N]`` lesion id, -1 for
    non-tumour tiles. ``stride``: the grid step of ``coords`` (default: the smallest non-zero step)."""
    from scipy import ndimage

    coords = np.asarray(coords, np.int64)
    y = as_instance_labels(instance_labels, len(coords))
    if stride is None:
        steps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
        steps = np.concatenate([s[s > 0] for s in steps])
        stride = float(steps.min()) if len(steps) else 1.0
    grid = np.round((coords - coords.min(0)) / stride).astype(np.int64)
    canvas = np.zeros(grid.max(0) + 1, bool)
    canvas[grid[y == 1, 0], grid[y == 1, 1]] = True
    labelled, _ = ndimage.label(canvas)
    ids = labelled[grid[:, 0], grid[:, 1]] - 1
    return np.where(y == 1, ids, -1)


def localization_scores(scores: Any, instance_labels: Any, coords: Any | None = None,
                        threshold: float = 0.5) -> dict[str, float]:
    """ASMIL's tile-level localization (spec §4.2) from one slide's read-out, min-max rescaled, thresholded:
    ``dice`` (positive slides), ``specificity`` (share of tiles below the threshold; negative slides),
    ``success`` (every tumour tile above it: the literal reading) and ``lesion_success`` (every lesion, a
    connected component on the grid, has a tile above it; needs ``coords``). NaN where undefined."""
    a = rescaled_scores(scores)
    y = as_instance_labels(instance_labels, a.shape[0])
    hit = a > threshold
    out = {"dice": float("nan"), "specificity": float("nan"), "success": float("nan"),
           "lesion_success": float("nan")}
    if not y.any():
        out["specificity"] = float((~hit).mean())
        return out
    out["dice"] = float(2 * (hit & (y == 1)).sum() / (hit.sum() + y.sum()))
    out["success"] = float(hit[y == 1].all())
    if coords is not None:
        ids = lesions(coords, y)
        out["lesion_success"] = float(all(hit[ids == lesion].any() for lesion in np.unique(ids[ids >= 0])))
    return out
