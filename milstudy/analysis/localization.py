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


def grid_positions(coords: Any, stride: float | None = None) -> np.ndarray:
    """Integer grid cells ``[N, 2]`` of patch ``coords`` (level-0 pixels), origin at the smallest coordinate.
    ``stride``: the grid step (default: the smallest non-zero step along either axis, 1 if there is none)."""
    coords = np.asarray(coords, np.int64)
    if stride is None:
        steps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
        steps = np.concatenate([s[s > 0] for s in steps])
        stride = float(steps.min()) if len(steps) else 1.0
    return np.round((coords - coords.min(0)) / stride).astype(np.int64)


def lesions(coords: Any, instance_labels: Any, stride: float | None = None) -> np.ndarray:
    """Connected components (4-neighbour on the patch grid) of the tumour tiles: ``[N]`` lesion id, -1 for
    non-tumour tiles. ``stride``: the grid step of ``coords`` (default: the smallest non-zero step)."""
    from scipy import ndimage

    grid = grid_positions(coords, stride)
    y = as_instance_labels(instance_labels, len(grid))
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


# ----------------------------------------------------------- FROC (CAMELYON-16 protocol on the patch grid, spec §4.2)
FROC_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def detections(scores: Any, coords: Any, radius: int = 1, stride: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Point detections of one slide: greedy non-maximum suppression of the min-max rescaled read-out on the patch
    grid (take the highest tile, suppress every tile within ``radius`` cells (Chebyshev), repeat; a (2r+1)-tile
    window, 3 x 3 by default; spec §4.2 "local maxima after 3-tile NMS, scored by value"). Returns (tile
    indices, scores), highest first."""
    a = rescaled_scores(scores)
    grid = grid_positions(coords, stride)
    alive = np.ones(grid.max(0) + 1 + 2 * radius, bool)
    keep = []
    for i in np.argsort(-a, kind="stable"):
        x, y = grid[i] + radius
        if alive[x, y]:
            keep.append(i)
            alive[x - radius:x + radius + 1, y - radius:y + radius + 1] = False
    keep = np.asarray(keep, np.int64)
    return keep, a[keep]


def froc(slides: Sequence[tuple[Any, Any, Any]], tolerance: int = 1, nms_radius: int = 1,
         fp_rates: Sequence[float] = FROC_FP_RATES) -> dict[str, Any]:
    """The CAMELYON-16 FROC score on patch grids: ``slides`` = (scores ``[N]``, instance labels ``[N]``, coords
    ``[N, 2]``) per slide, tumour and normal. A lesion is a connected component of tumour tiles; a detection
    (:func:`detections`) within ``tolerance`` cells of a lesion's tile is a true positive of that lesion (each
    lesion counts once, at its best detection's score), any other detection a false positive. Over all thresholds:
    sensitivity = detected lesions / all lesions, FP rate = false positives / all slides (the challenge's
    evaluation divides by every image); the score is the mean sensitivity at ``fp_rates`` (linear interpolation).
    Returns ``score``, the curve (``fp_per_slide``, ``sensitivity``), ``n_lesions`` and ``n_slides``."""
    fp_scores, lesion_best, n_lesions = [], [], 0
    for scores, labels, coords in slides:
        grid = grid_positions(coords)
        ids = lesions(coords, labels)
        canvas = np.full(grid.max(0) + 1 + 2 * tolerance, -1, np.int64)
        canvas[grid[:, 0] + tolerance, grid[:, 1] + tolerance] = ids
        n_here = int(ids.max()) + 1 if (ids >= 0).any() else 0
        best = np.full(n_here, -np.inf)
        for tile, value in zip(*detections(scores, coords, nms_radius)):
            x, y = grid[tile] + tolerance
            hit = np.unique(canvas[x - tolerance:x + tolerance + 1, y - tolerance:y + tolerance + 1])
            hit = hit[hit >= 0]
            if hit.size:
                best[hit] = np.maximum(best[hit], value)
            else:
                fp_scores.append(value)
        lesion_best.extend(best.tolist())
        n_lesions += n_here
    n_slides = len(slides)
    if n_slides == 0 or n_lesions == 0:
        raise ValueError(f"froc: needs slides with at least one lesion (got {n_slides} slides, {n_lesions} lesions)")
    fp_scores, lesion_best = np.asarray(fp_scores), np.asarray(lesion_best)
    thresholds = np.unique(np.r_[fp_scores, lesion_best[np.isfinite(lesion_best)]])[::-1]
    fp_rate = np.array([(fp_scores >= t).sum() for t in thresholds]) / n_slides
    sensitivity = np.array([(lesion_best >= t).sum() for t in thresholds]) / n_lesions
    fp_rate, sensitivity = np.r_[0.0, fp_rate], np.r_[0.0, sensitivity]  # above every score: nothing detected
    score = float(np.mean(np.interp(fp_rates, fp_rate, sensitivity)))
    return {"score": score, "fp_per_slide": fp_rate, "sensitivity": sensitivity, "n_lesions": n_lesions,
            "n_slides": n_slides}
