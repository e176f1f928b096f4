"""Attention stability over training (ASMIL, Ye et al.; specs/asmil.md §4.2 "Stability (PI)", paper Eqs. 3, 35).

From attention snapshots ``{epoch: {slide_id: [N] or [heads, N]}}`` taken in eval mode (the head mean is used;
snapshots are sorted by epoch, which the released script does not do):

- ``jsd(p, q)``: Jensen-Shannon divergence, natural log, probabilities clamped at 1e-8, in [0, ln 2];
- ``stability_table``: per slide and epoch e, ``jsd_next`` = JSD(a^(e), a^(e+1)) and ``jsd_final`` =
  JSD(a^(e), a^(E)), plus the normalised entropy of a^(e) (the entropy control: flatter attention alone lowers
  JSD, so a stabilisation claim compares runs at matched entropy);
- ``late_instability``: per slide, the mean ``jsd_next`` over the second half of the epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis._arrays import head_mean_attention
from milstudy.analysis.sparsity import normalized_entropy

EPS = 1e-8


def jsd(p: Any, q: Any) -> float:
    """JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2, m = (p + q) / 2; natural log, clamped at 1e-8."""
    p, q = np.clip(np.asarray(p, np.float64), EPS, None), np.clip(np.asarray(q, np.float64), EPS, None)
    if p.shape != q.shape:
        raise ValueError(f"jsd: the two distributions have shapes {p.shape} and {q.shape}")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


def stability_table(snapshots: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (slide_id, epoch): ``jsd_next`` (NaN at the last epoch), ``jsd_final`` and
    ``normalized_entropy``. Slides missing from some epoch are compared over the epochs that hold them."""
    epochs = sorted(int(e) for e in snapshots)
    slides = sorted({sid for e in epochs for sid in snapshots[e]})
    rows = []
    for sid in slides:
        held = [e for e in epochs if sid in snapshots[e]]
        series = {e: head_mean_attention(snapshots[e][sid]) for e in held}
        final = series[held[-1]]
        for i, e in enumerate(held):
            nxt = series[held[i + 1]] if i + 1 < len(held) else None
            rows.append({"slide_id": sid, "epoch": e, "jsd_next": jsd(series[e], nxt) if nxt is not None else np.nan,
                         "jsd_final": jsd(series[e], final), "normalized_entropy": normalized_entropy(series[e])})
    return pd.DataFrame(rows, columns=["slide_id", "epoch", "jsd_next", "jsd_final", "normalized_entropy"])


def late_instability(table: pd.DataFrame) -> pd.DataFrame:
    """Per slide: the mean ``jsd_next`` over the second half of the epochs (``late_jsd``) and over the first half
    (``early_jsd``), and the mean normalised entropy of the second half."""
    rows = []
    for sid, part in table.dropna(subset=["jsd_next"]).groupby("slide_id"):
        part = part.sort_values("epoch")
        half = len(part) // 2
        rows.append({"slide_id": sid, "early_jsd": part["jsd_next"].iloc[:max(half, 1)].mean(),
                     "late_jsd": part["jsd_next"].iloc[half:].mean(),
                     "late_entropy": part["normalized_entropy"].iloc[half:].mean()})
    return pd.DataFrame(rows, columns=["slide_id", "early_jsd", "late_jsd", "late_entropy"])
