"""Slide-level metrics and bootstrap confidence intervals (specs/abmilx.md §4.2 and §3 pitfalls 5-6).

Thin wrappers around scikit-learn and scikit-survival so that every notebook computes a metric the same way:

- ``accuracy`` (top-1, micro), ``balanced_accuracy`` (mean per-class recall; upstream ABMILX's "Acc" for multi-class),
  ``f1`` (macro by default; micro only when asked for by name), ``roc_auc`` (binary: AUC of the positive-class
  probability; multi-class: macro one-vs-rest), ``quadratic_kappa`` (Cohen's kappa with quadratic weights), and
  ``c_index`` (Harrell's concordance via ``sksurv.metrics.concordance_index_censored``: a pair is comparable if the
  earlier time is an event; tied risks count 0.5).
- ``bootstrap_ci``: percentile bootstrap (1000 resamples, fixed seed) returning mean, std and the 2.5/97.5 %
  percentiles; resamples on which the metric is undefined (e.g. one class only) are skipped and counted.
- ``summarize``: "mean ± std" text for a list of per-fold / per-seed values.

Metrics raise ``ValueError`` when they are undefined on the given data (one class only, no comparable pair), so
callers decide between skipping and reporting NaN (``safe_metric``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from sklearn import metrics as skm


def _labels(y: Any) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"expected a 1-D array of class indices, got shape {y.shape}")
    return y.astype(np.int64)


def _probabilities(p: Any) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 1:  # binary, positive-class probability
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"expected probabilities of shape [n, classes], got shape {p.shape}")
    return p


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Top-1 (micro) accuracy: the fraction of slides whose predicted class equals the label."""
    return float(skm.accuracy_score(_labels(y_true), _labels(y_pred)))


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small splits
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(_labels(y_true), _labels(y_pred)))


def f1(y_true: Sequence[int], y_pred: Sequence[int], average: str = "macro") -> float:
    """F1 score; ``average="macro"`` (default, unweighted mean over classes) or ``"micro"`` when asked by name."""
    if average not in ("macro", "micro", "binary", "weighted"):
        raise ValueError(f"f1: unknown average {average!r}; use 'macro' (default) or 'micro'")
    return float(skm.f1_score(_labels(y_true), _labels(y_pred), average=average, zero_division=0))


def roc_auc(y_true: Sequence[int], probabilities: Any) -> float:
    """ROC-AUC. ``probabilities [n, C]`` (or ``[n]`` positive-class probabilities for binary tasks).

    Binary (C = 2): AUC of the positive-class (index 1) probability. Multi-class: macro one-vs-rest AUC over all C
    classes (scikit-learn ``multi_class="ovr", average="macro"``). Raises ``ValueError`` when undefined (a class of
    the one-vs-rest problems is absent from ``y_true``).
    """
    y = _labels(y_true)
    p = _probabilities(probabilities)
    n_classes = p.shape[1]
    if n_classes == 2:
        if len(np.unique(y)) < 2:
            raise ValueError("roc_auc is undefined: only one class present in y_true")
        return float(skm.roc_auc_score(y, p[:, 1]))
    present = np.unique(y)
    if len(present) < n_classes:
        raise ValueError(
            f"macro one-vs-rest roc_auc is undefined: y_true has classes {present.tolist()} of {n_classes}"
        )
    p = p / p.sum(axis=1, keepdims=True)  # float32 softmax outputs may miss sklearn's sum-to-one tolerance
    return float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(n_classes)))


def quadratic_kappa(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Cohen's kappa with quadratic weights (QWK), the PANDA grading metric."""
    y, yp = _labels(y_true), _labels(y_pred)
    if len(np.union1d(y, yp)) < 2:
        raise ValueError("quadratic_kappa is undefined: a single grade in both labels and predictions")
    return float(skm.cohen_kappa_score(y, yp, weights="quadratic"))


def c_index(time: Sequence[float], event: Sequence[int | bool], risk: Sequence[float]) -> float:
    """Harrell's C-index (scikit-survival ``concordance_index_censored``; higher risk = earlier event).

    A pair (i, j) is comparable if ``event[i]`` and ``time[i] < time[j]``; it is concordant if ``risk[i] > risk[j]``;
    tied risks count 0.5. Raises ``ValueError`` if there is no comparable pair.
    """
    from sksurv.metrics import concordance_index_censored

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=np.float64)
    if not (len(time) == len(event) == len(risk)):
        raise ValueError(f"c_index: lengths differ (time {len(time)}, event {len(event)}, risk {len(risk)})")
    if not event.any():
        raise ValueError("c_index is undefined: no events (all cases censored)")
    try:
        return float(concordance_index_censored(event, time, risk)[0])
    except ZeroDivisionError as err:  # no comparable pairs
        raise ValueError("c_index is undefined: no comparable pairs") from err


def safe_metric(fn: Callable[..., float], *args, **kwargs) -> float:
    """``fn(*args)`` or NaN when the metric is undefined on these data (``ValueError``)."""
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return float("nan")


@dataclass(frozen=True)
class BootstrapCI:
    """Bootstrap summary. Unpacks as ``mean, std, lo, hi = bootstrap_ci(...)``."""

    mean: float
    std: float
    lo: float
    hi: float
    n_valid: int
    n_skipped: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.mean, self.std, self.lo, self.hi))

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _take(obj: Any, idx: np.ndarray) -> Any:
    if isinstance(obj, tuple):
        return tuple(_take(o, idx) for o in obj)
    return np.asarray(obj)[idx]


def _length(obj: Any) -> int:
    return len(obj[0]) if isinstance(obj, tuple) else len(np.asarray(obj))


def bootstrap_ci(
    metric_fn: Callable[[Any, Any], float],
    y: Any,
    p: Any,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapCI:
    """Percentile bootstrap of ``metric_fn(y, p)`` over slides.

    ``y`` and ``p`` are arrays with one row per slide, or tuples of such arrays (e.g. ``y = (time, event)``), and are
    resampled together with replacement ``n`` times from ``numpy.random.default_rng(seed)``. Resamples where the
    metric raises ``ValueError`` or returns NaN are skipped and counted in ``n_skipped``. Returns the mean and std
    (ddof = 1) of the valid resamples and the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles.
    """
    size = _length(y)
    if size != _length(p):
        raise ValueError(f"bootstrap_ci: y has {size} rows but p has {_length(p)}")
    if size == 0:
        raise ValueError("bootstrap_ci: no rows")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    skipped = 0
    for _ in range(n):
        idx = rng.integers(0, size, size)
        try:
            value = float(metric_fn(_take(y, idx), _take(p, idx)))
        except ValueError:
            skipped += 1
            continue
        if np.isnan(value):
            skipped += 1
            continue
        values.append(value)
    if not values:
        nan = float("nan")
        return BootstrapCI(nan, nan, nan, nan, 0, skipped)
    arr = np.asarray(values)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(arr, [tail, 100 - tail])
    if arr.min() == arr.max():  # exactly constant: avoid 1e-16 rounding noise in mean/std
        return BootstrapCI(float(arr[0]), 0.0, float(arr[0]), float(arr[0]), len(arr), skipped)
    return BootstrapCI(float(arr.mean()), float(arr.std(ddof=1)), float(lo), float(hi), len(arr), skipped)


def summarize(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` (sample std, ddof = 1; 0 for a single value) of the finite values, or ``"n/a"``."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return "n/a"
    std = arr.std(ddof=1) if arr.size > 1 else 0.0
    return f"{arr.mean():.{digits}f} ± {std:.{digits}f}"
