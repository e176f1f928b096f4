"""House style for intervals: error bars that say what they are, clipped to the metric's range, chance lines,
and the forest plot of a claims table (:func:`milstudy.analysis.claims.claims_table`). Re-exported by
:mod:`milstudy.plots`, import from there.

- ``metric_range("test_auc") -> (0, 1)``, ``chance_level("c_index") -> 0.5``: looked up by metric name with the
  ``test_`` / ``val_`` prefix and ``_mean`` suffix stripped (None for unbounded metrics such as risk).
- ``error_bar_label([5, 5]) -> "mean ± 95 % CI over 5 seeds"``; ``clip_interval(low, high, bounds)``.
- ``mark_chance(ax, "auc")``: dashed chance line labelled "chance (0.5)".
- ``interval_errorbar(ax, x, summaries, metric)``: points with t-intervals over seeds, clipped and labelled.
- ``forest_plot(table)``: one row per claim: difference (dot), 1 - alpha interval (thick), Holm-widened verdict
  interval (thin), zero line, colour by verdict.

Example::

    from milstudy import plots
    fig = plots.forest_plot(table, title="ABMILX claims on the synthetic detection cohort")
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

UNIT_RANGE_METRICS = ("auc", "accuracy", "balanced_accuracy", "c_index", "f1_macro", "f1_micro", "instance_auroc",
                      "top_k_precision", "qwk_abs", "sparsity", "mass_on_tumour", "top1_is_noise")
CHANCE_LEVELS = {"auc": 0.5, "c_index": 0.5, "instance_auroc": 0.5}
VERDICT_COLOURS = {"supported": "#009e73", "contradicted": "#d55e00", "inconclusive": "#7f7f7f"}


def _base_name(metric: str) -> str:
    name = metric.lower()
    for prefix in ("test_last_", "test_", "val_", "our_"):
        name = name.removeprefix(prefix)
    for suffix in ("_mean", "_all", "_pos"):
        name = name.removesuffix(suffix)
    return name


def metric_range(metric: str) -> tuple[float, float] | None:
    """The range of ``metric`` ((0, 1) for AUC, accuracy, C-index, shares...), None if unbounded or unknown."""
    return (0.0, 1.0) if _base_name(metric) in UNIT_RANGE_METRICS else None


def chance_level(metric: str) -> float | None:
    """The value of a random ranking (0.5 for AUC, C-index, instance AUROC), None where no such level exists."""
    return CHANCE_LEVELS.get(_base_name(metric))


def error_bar_label(n_seeds: int | Sequence[int], level: float = 0.95, centre: str = "mean") -> str:
    """"mean ± 95 % CI over 5 seeds" (a range "3-5 seeds" when groups differ)."""
    counts = [int(n_seeds)] if np.isscalar(n_seeds) else [int(n) for n in n_seeds]
    if not counts:
        raise ValueError("n_seeds is empty")
    low, high = min(counts), max(counts)
    seeds = f"{low} seed{'s' if low > 1 else ''}" if low == high else f"{low}-{high} seeds"
    return f"{centre} ± {100 * level:g} % CI over {seeds}"


def clip_interval(low: Any, high: Any, bounds: tuple[float, float] | str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` clipped to ``bounds`` (a pair, a metric name looked up with :func:`metric_range`, or None).
    A t-interval of AUC near 1 can run past 1; the bar must not."""
    if isinstance(bounds, str):
        bounds = metric_range(bounds)
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if bounds is None:
        return low, high
    return np.clip(low, *bounds), np.clip(high, *bounds)


def mark_chance(ax: Axes, metric: str, axis: str = "y") -> Any:
    """Dashed line at the chance level of ``metric`` (if it has one), labelled "chance (0.5)"; returns it."""
    level = chance_level(metric)
    if level is None:
        return None
    line = ax.axhline if axis == "y" else ax.axvline
    return line(level, color="grey", linestyle="--", linewidth=1, label=f"chance ({level:g})", zorder=0)


def interval_errorbar(ax: Axes, x: Sequence[float], summaries: Sequence[Any], metric: str, **kwargs: Any) -> Any:
    """Points at the means with error bars from ``summaries`` (``SeedSummary`` of
    :func:`milstudy.analysis.stats.seed_summary`), clipped to the metric's range; sets the y label to
    "<metric> (mean ± 95 % CI over n seeds)" and draws the chance line. Returns the errorbar container."""
    means = np.array([s.mean for s in summaries])
    low, high = clip_interval([s.ci_low for s in summaries], [s.ci_high for s in summaries], metric)
    container = ax.errorbar(x, means, yerr=np.vstack([means - low, high - means]), fmt="o", capsize=3, **kwargs)
    ax.set_ylabel(f"{metric}\n({error_bar_label([s.n for s in summaries], summaries[0].level)})")
    mark_chance(ax, metric)
    return container


def forest_plot(table: pd.DataFrame, ax: Axes | None = None, title: str | None = None, wrap: int = 45) -> Figure:
    """A claims table as a forest plot: one row per claim (top = first), its difference A − B (dot), the
    ``level`` interval (thick bar), the Holm-widened verdict interval (thin whisker), a zero line, colour by verdict
    and the verdict written at the right. Differences are in each row's metric units (shown in the row label)."""
    need = ["claim", "metric", "difference", "ci_low", "ci_high", "verdict_ci_low", "verdict_ci_high", "verdict"]
    missing = [c for c in need if c not in table]
    if missing:
        raise ValueError(f"table lacks {missing}; pass the output of milstudy.analysis.claims.claims_table")
    if table.empty:
        raise ValueError("table has no claims to plot")
    n = len(table)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 0.55 * n + 1.3))
    fig = ax.figure
    y = np.arange(n)[::-1]
    for yi, (_, row) in zip(y, table.iterrows()):
        colour = VERDICT_COLOURS.get(row["verdict"], "black")
        ax.plot([row["verdict_ci_low"], row["verdict_ci_high"]], [yi, yi], color=colour, linewidth=1)
        ax.plot([row["ci_low"], row["ci_high"]], [yi, yi], color=colour, linewidth=4, solid_capstyle="butt")
        ax.plot([row["difference"]], [yi], "o", color="white", markeredgecolor=colour, markersize=7)
        ax.annotate(row["verdict"], (1.01, yi), xycoords=("axes fraction", "data"), va="center", fontsize=8,
                    color=colour)
    ax.axvline(0.0, color="black", linewidth=1)
    labels = [textwrap.fill(f"{c} [{m}]", wrap) for c, m in zip(table["claim"], table["metric"])]
    ax.set_yticks(y, labels, fontsize=8)
    level = float(table["level"].iloc[0]) if "level" in table else 0.95
    ax.set_xlabel(f"difference A − B (metric units); thick: {100 * level:g} % CI, thin: Holm-widened verdict interval")
    ax.grid(axis="y", visible=False)
    ax.set_title(title or "Claims: our difference with its interval")
    return fig


def grouped_intervals(summary: pd.DataFrame, x: str, hue: str, metric: str, ax: Axes | None = None,
                      level: float = 0.95, title: str | None = None) -> Figure:
    """Per ``hue`` group, ``<metric>_mean`` with its ``<metric>_low`` / ``<metric>_high`` interval at each
    category of ``x`` (in the frame's order, or a categorical's), points joined by lines and dodged so bars do not
    overlap; the y label says what the bars are (``n_seeds`` column), the chance line is drawn."""
    need = [x, hue, f"{metric}_mean", f"{metric}_low", f"{metric}_high", "n_seeds"]
    missing = [c for c in need if c not in summary]
    if missing:
        raise ValueError(f"summary lacks {missing}; pass one row per ({hue}, {x}) with mean / low / high columns")
    categories = (list(summary[x].cat.categories) if isinstance(summary[x].dtype, pd.CategoricalDtype)
                  else list(dict.fromkeys(summary[x])))
    categories = [c for c in categories if c in set(summary[x])]
    groups = list(dict.fromkeys(summary[hue]))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(categories)), 4.2))
    width = 0.6 / max(1, len(groups))
    for k, group in enumerate(groups):
        rows = summary[summary[hue] == group].set_index(x).reindex(categories)
        position = np.arange(len(categories)) + (k - (len(groups) - 1) / 2) * width
        mean = rows[f"{metric}_mean"].to_numpy(float)
        low, high = clip_interval(rows[f"{metric}_low"].fillna(rows[f"{metric}_mean"]),
                                  rows[f"{metric}_high"].fillna(rows[f"{metric}_mean"]), metric)
        ax.errorbar(position, mean, yerr=np.vstack([mean - low, high - mean]), fmt="o-", capsize=3, linewidth=1,
                    markersize=4, label=str(group))
    ax.set_xticks(np.arange(len(categories)), [textwrap.fill(str(c), 18) for c in categories], fontsize=8)
    ax.set_ylabel(f"{metric}\n({error_bar_label(summary['n_seeds'].tolist(), level)}, t-interval)")
    mark_chance(ax, metric)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    return ax.figure
