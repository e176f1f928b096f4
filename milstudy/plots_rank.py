"""Figures of the LongMIL rank and scaling analyses (spec ``shared/specs/longmil.md`` §4.1-4.2; re-exported by
:mod:`milstudy.plots`), in the house style:

- ``rank_measures_plot``: every rank definition (as a share of n) and the Eq. 9 sparsity per attention type, mean
  ± 95 % t-interval over seeds (points alone with one seed);
- ``attention_raster_maps``: n x n attention matrices in raster order on a log colour scale (paper Fig. 2a/c);
- ``toy_matrix_panels``: the Fig. 5 toy masks and the ALiBi bias on a small grid, values printed;
- ``loglog_cost_axes``: the log-log axes of every cost-vs-N panel (also the model-zoo bench's);
- ``scaling_plot``: time and peak memory vs N per implementation on log-log axes (paper Fig. 7), with the fitted
  slopes in the legend and an optional second frame (a re-measurement) drawn with open markers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from milstudy.analysis.stats import seed_summary

RANK_COLUMNS = {
    "numerical_rank_frac": "numerical rank / n",
    "rank_rel_0.01_frac": "rank (σ > 1e-2 σ₁) / n",
    "rank_rel_0.001_frac": "rank (σ > 1e-3 σ₁) / n",
    "effective_rank_frac": "entropy effective rank / n",
    "stable_rank_frac": "stable rank / n",
    "sparsity": "sparsity (Eq. 9)",
}


def _interval(values: pd.Series) -> tuple[float, float, float]:
    if len(values) < 2:
        v = float(values.mean())
        return v, v, v
    s = seed_summary(values.to_numpy())
    return s.mean, s.ci_low, s.ci_high


def rank_measures_plot(table: pd.DataFrame, columns: Mapping[str, str] | None = None, kind_column: str = "kind",
                       hue: str | None = "temperature", title: str | None = None) -> Figure:
    """One panel per measure (``columns``: name -> label, default :data:`RANK_COLUMNS` present in ``table``), one
    row of points per attention type, one colour per ``hue`` value; a :func:`~milstudy.analysis.attention_rank
    .rank_table` frame with a ``seed`` column gives the intervals."""
    columns = {c: l for c, l in (columns or RANK_COLUMNS).items() if c in table}
    if not columns:
        raise ValueError(f"table has none of the measure columns {list(RANK_COLUMNS)}; pass a rank_table frame")
    kinds = list(dict.fromkeys(table[kind_column]))
    hues = list(dict.fromkeys(table[hue])) if hue is not None and hue in table else [None]
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns) + 1.5, 0.32 * len(kinds) + 1.6),
                             sharey=True, squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (column, label) in zip(axes[0], columns.items()):
        for h_index, value in enumerate(hues):
            rows = table if value is None else table[table[hue] == value]
            offset = (h_index - (len(hues) - 1) / 2) * 0.22
            for y, kind in enumerate(kinds):
                values = rows.loc[rows[kind_column] == kind, column]
                if values.empty:
                    continue
                mean, low, high = _interval(values)
                ax.errorbar(mean, y + offset, xerr=[[mean - low], [high - mean]], fmt="o", ms=3.5,
                            color=palette[h_index % len(palette)], capsize=2,
                            label=None if y else (f"{hue} = {value:g}" if value is not None else None))
        ax.set_xlabel(label)
        ax.set_xlim(-0.03, 1.03)
    axes[0, 0].set_yticks(range(len(kinds)), kinds)
    axes[0, 0].invert_yaxis()
    if hues != [None]:
        axes[0, -1].legend(loc="lower right", fontsize=7)
    n_seeds = table["seed"].nunique() if "seed" in table else 1
    fig.suptitle(title or f"Rank and sparsity of attention (mean ± 95 % CI over {n_seeds} seed(s))")
    fig.tight_layout()
    return fig


def attention_raster_maps(records: Sequence[Mapping[str, Any]], floor: float = 1e-6, max_tokens: int = 600,
                          title: str | None = None) -> Figure:
    """``records``: mappings with ``attention [n, n]`` and ``kind`` (and optionally ``temperature``); each drawn
    as log10(max(A, floor)) over its first ``max_tokens`` raster-ordered tokens (Fig. 2a/c)."""
    if not records:
        raise ValueError("records is empty; pass records of milstudy.analysis.attention_matrices.attention_matrices")
    fig, axes = plt.subplots(1, len(records), figsize=(3.0 * len(records), 3.3), squeeze=False)
    image = None
    for ax, record in zip(axes[0], records):
        a = np.asarray(record["attention"])[:max_tokens, :max_tokens]
        image = ax.imshow(np.log10(np.clip(a, floor, None)), vmin=np.log10(floor), vmax=0, interpolation="nearest")
        label = record["kind"] + (f", T = {record['temperature']:g}" if "temperature" in record else "")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="log10 attention")
    fig.suptitle(title or f"Attention matrices in raster order (first {max_tokens} tokens)")
    return fig


def toy_matrix_panels(matrices: Mapping[str, np.ndarray], title: str | None = None) -> Figure:
    """One panel per matrix of :func:`milstudy.analysis.toy_matrices.fig5_matrices` (boolean masks black on white,
    a bias as a colour scale), tokens in raster order, every value printed when n <= 16 (as in Fig. 5)."""
    if not matrices:
        raise ValueError("matrices is empty; pass milstudy.analysis.toy_matrices.fig5_matrices()")
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.9), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        matrix = np.asarray(matrix)
        is_mask = matrix.dtype == bool
        ax.imshow(matrix.astype(float), cmap="Greys" if is_mask else "viridis", interpolation="nearest")
        if len(matrix) <= 16:
            for (i, j), value in np.ndenumerate(matrix):
                text = ("1" if value else "") if is_mask else f"{value + 0.0:.2f}"  # + 0.0: no "-0.00"
                ax.text(j, i, text, ha="center", va="center", fontsize=3.6 if not is_mask else 5,
                        color="white" if is_mask or value < matrix.min() / 2 else "black")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(matrix)), [str(i) for i in range(len(matrix))], fontsize=5)
        ax.set_yticks(range(len(matrix)), [str(i) for i in range(len(matrix))], fontsize=5)
        ax.grid(False)
    fig.suptitle(title or "Fig. 5 toy matrices (tokens of the grid in raster order)")
    fig.tight_layout()
    return fig


def loglog_cost_axes(axes: Sequence[Any], xlabel: str, ylabels: Sequence[str]) -> None:
    """Log-log axes with a grid on both decades, ``xlabel`` on each and ``ylabels`` in order (cost-vs-N panels)."""
    for ax, label in zip(axes, ylabels):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)


def scaling_plot(frame: pd.DataFrame, remeasured: pd.DataFrame | None = None, impl_column: str = "impl",
                 title: str | None = None) -> Figure:
    """Time and peak memory vs N (``n``, ``time_s``, ``peak_mem_mb``, ``status`` columns; the ``ok`` points) per
    implementation, log-log, legend with ``time_slope`` / ``memory_slope`` when present; ``remeasured``: a second
    frame of the same layout drawn with open markers and dashed lines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    impls = list(dict.fromkeys(frame[impl_column]))
    for source, style in ((frame, {"marker": "o", "ls": "-"}), (remeasured, {"marker": "s", "ls": "--", "mfc": "none"})):
        if source is None:
            continue
        ok = source[source["status"] == "ok"]
        for impl, rows in ok.groupby(impl_column, sort=False):
            colour = palette[(impls.index(impl) if impl in impls else len(impls)) % len(palette)]
            slope = ""
            if "time_slope" in rows and source is frame:
                slope = f" (slopes {rows['time_slope'].iloc[0]:.2f} / {rows['memory_slope'].iloc[0]:.2f})"
            label = impl + (slope if source is frame else " (re-measured)")
            axes[0].plot(rows["n"], rows["time_s"], color=colour, label=label, **style)
            axes[1].plot(rows["n"], rows["peak_mem_mb"].clip(lower=0.5), color=colour, label=label, **style)
    loglog_cost_axes(axes, "tokens N", ("forward + backward time (s)", "peak memory increase (MB, RSS)"))
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "2-D local vs dense and full attention: cost vs N (slopes time / memory, log-log)")
    fig.tight_layout()
    return fig
