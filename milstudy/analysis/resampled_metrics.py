"""Metrics that the claims bootstrap can score on thousands of resamples at once (``Metric.resampled``): AUC,
C-index and accuracy from multiplicity counts of resampled slides, checked against sklearn / sksurv; part of
:mod:`milstudy.analysis.stats`, which re-exports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

@dataclass(frozen=True)
class Metric:
    """A slide-level metric the bootstrap can evaluate on resampled slides from per-seed arrays.

    ``frame_fn(frame) -> float`` is the reference (scikit-learn / scikit-survival through
    ``milstudy.train.metrics``) and gives the observed values. For resamples, ``prepare(frame)`` returns arrays:

    - ``kind="pairwise"``: ``(concordant [n, n], comparable [n, n])``, for metrics that are a ratio of weighted
      pair counts (AUC = Mann-Whitney, Harrell's C). A resample with slide multiplicities ``c [n]`` has value
      ``c' K c / c' M c``, exactly the metric of the resampled frame (a slide paired with its own copy is never
      comparable), so the bootstrap needs one matrix product per seed, not one DataFrame per resample.
    - ``kind="mean"``: ``(per-slide values [n],)``; a resample's value is ``c' v / n``.
    - ``kind="pairwise_macro"``: ``(concordant [C, n, n], comparable [C, n, n])``, one pairwise ratio per class,
      averaged (macro one-vs-rest AUC); undefined when any class has no comparable pair in the resample.

    ``targets``: columns that must agree between two methods on the same slide; ``scores``: the method's output.
    ``bounds``: the metric's range (for clipped error bars); ``chance``: the value of a random ranking.
    """

    name: str
    targets: tuple[str, ...]
    scores: tuple[str, ...]
    frame_fn: Callable[[pd.DataFrame], float]
    prepare: Callable[[pd.DataFrame], tuple[np.ndarray, ...]]
    kind: Literal["pairwise", "mean", "pairwise_macro"] = "pairwise"
    bounds: tuple[float, float] | None = (0.0, 1.0)
    chance: float | None = 0.5

    @property
    def columns(self) -> tuple[str, ...]:
        return self.targets + self.scores

    def __call__(self, frame: pd.DataFrame) -> float:
        return float(self.frame_fn(frame))

    def resampled(self, frame: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
        """Metric of each resample ``counts [R, n]`` (multiplicity of each row of ``frame``) -> ``[R]``; NaN where
        undefined (e.g. one class only)."""
        arrays = self.prepare(frame)
        return _resampled_from_arrays(self.kind, arrays, counts)


def _resampled_from_arrays(kind: str, arrays: tuple[np.ndarray, ...], counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if kind == "mean":
        return c @ arrays[0] / c.sum(axis=1)
    if kind == "pairwise_macro":
        per_class = [_resampled_from_arrays("pairwise", (k, m), c) for k, m in zip(*arrays)]
        return np.mean(per_class, axis=0)  # NaN where any class is undefined
    concordant, comparable = arrays
    num = np.einsum("rn,rn->r", c @ concordant, c)
    den = np.einsum("rn,rn->r", c @ comparable, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _concordance(score: np.ndarray, comparable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) with ``comparable[i, j]``: concordant if score_i > score_j, half if tied."""
    greater = (score[:, None] > score[None, :]).astype(np.float64)
    tied = (score[:, None] == score[None, :]).astype(np.float64)
    comp = comparable.astype(np.float64)
    return comp * (greater + 0.5 * tied), comp


def auc_metric(target: str = "target", score: str = "prob_1", name: str = "auc") -> Metric:
    """Binary ROC-AUC of ``score`` against 0/1 ``target`` (``milstudy.train.metrics.roc_auc``; average ranks for
    ties, i.e. the Mann-Whitney U / (n_pos n_neg)). Comparable pairs: (positive i, negative j)."""
    from milstudy.train.metrics import roc_auc

    def frame_fn(frame: pd.DataFrame) -> float:
        return roc_auc(frame[target].to_numpy(), frame[score].to_numpy(np.float64))

    def prepare(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        y = frame[target].to_numpy()
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"auc_metric: column {target!r} must be 0/1, got values {np.unique(y)[:5]}")
        positive = y == 1
        return _concordance(frame[score].to_numpy(np.float64), positive[:, None] & ~positive[None, :])

    return Metric(name, (target,), (score,), frame_fn, prepare)


def macro_auc_metric(n_classes: int, target: str = "target", prefix: str = "prob_", name: str = "auc") -> Metric:
    """Macro one-vs-rest ROC-AUC over ``n_classes`` >= 3 classes from ``prob_0 .. prob_{C-1}`` (as
    ``milstudy.train.metrics.roc_auc`` and scikit-learn's ``multi_class="ovr", average="macro"``): per class c the
    pairs (slide of class c, slide of another class) ranked by ``prob_c``, the class AUCs averaged."""
    from milstudy.train.metrics import roc_auc

    if n_classes < 3:
        raise ValueError(f"macro_auc_metric: needs >= 3 classes (binary: auc_metric), got {n_classes}")
    scores = tuple(f"{prefix}{k}" for k in range(n_classes))

    def frame_fn(frame: pd.DataFrame) -> float:
        return roc_auc(frame[target].to_numpy(), frame[list(scores)].to_numpy(np.float64))

    def prepare(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        y = frame[target].to_numpy()
        if not np.isin(y, np.arange(n_classes)).all():
            raise ValueError(f"macro_auc_metric: column {target!r} must hold class indices 0..{n_classes - 1}, "
                             f"got values {np.unique(y)[:5]}")
        pairs = [_concordance(frame[score].to_numpy(np.float64), (y == k)[:, None] & (y != k)[None, :])
                 for k, score in enumerate(scores)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    return Metric(name, (target,), scores, frame_fn, prepare, kind="pairwise_macro")


def c_index_metric(time: str = "time", event: str = "event", risk: str = "risk", name: str = "c_index") -> Metric:
    """Harrell's C-index (``milstudy.train.metrics.c_index``, scikit-survival's rule): (i, j) comparable if
    event_i and (time_i < time_j, or equal times with j censored); concordant if risk_i > risk_j, ties 0.5."""
    from milstudy.train.metrics import c_index

    def frame_fn(frame: pd.DataFrame) -> float:
        return c_index(frame[time].to_numpy(), frame[event].to_numpy(), frame[risk].to_numpy())

    def prepare(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        t = frame[time].to_numpy(np.float64)
        e = frame[event].to_numpy().astype(bool)
        comparable = e[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :]))
        return _concordance(frame[risk].to_numpy(np.float64), comparable)

    return Metric(name, (time, event), (risk,), frame_fn, prepare)


def accuracy_metric(target: str = "target", prediction: str = "prediction", name: str = "accuracy") -> Metric:
    """Top-1 accuracy: share of slides with ``prediction == target`` (``milstudy.train.metrics.accuracy``)."""
    from milstudy.train.metrics import accuracy

    def frame_fn(frame: pd.DataFrame) -> float:
        return accuracy(frame[target].to_numpy(), frame[prediction].to_numpy())

    def prepare(frame: pd.DataFrame) -> tuple[np.ndarray]:
        return ((frame[target].to_numpy() == frame[prediction].to_numpy()).astype(np.float64),)

    return Metric(name, (target,), (prediction,), frame_fn, prepare, kind="mean", chance=None)
