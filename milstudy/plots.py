"""The house style for every milstudy figure, and the figure types the notebooks share.

- ``use_style()``: one matplotlib/seaborn look (white grid, colour-blind palette, readable font sizes).
- ``attention_heatmap``: head-mean attention on the slide thumbnail with a per-slide **rank-percentile** colour
  scale (our choice, spec abmilx §4.3 E8: raw attention spans orders of magnitude between models, ranks make
  maps comparable) and the ground-truth tumour contour.
  ``scale="mass"`` colours N·a on a fixed log scale instead (1 = uniform), so a peaked map looks peaked; the
  instance AUROC and the attention share of the top 10 % of patches are written under each map.
- ``attention_grid_map`` (no thumbnail), ``attention_histograms`` (distribution over training epochs),
  ``training_curves`` and ``umap_scatter``.
- Intervals: ``metric_table_plot`` (mean ± 95 % t-interval over seeds, clipped to the metric's range, labelled,
  chance line on AUC / C-index axes), ``forest_plot`` (a claims table: difference, interval, zero line, verdict
  colour), and the helpers ``error_bar_label``, ``clip_interval``, ``metric_range``, ``mark_chance``
  (these live in :mod:`milstudy.plots_intervals` and are re-exported here).
- Rank and scaling (LongMIL): ``rank_measures_plot``, ``attention_raster_maps``, ``scaling_plot`` (from
  :mod:`milstudy.plots_rank`, re-exported here).

Example::

    plots.metric_table_plot(per_seed, "test_auc", "model")        # y label "test_auc (mean ± 95 % CI over 5 seeds)"
    plots.forest_plot(claims_table(claims, predictions=preds))

Every function draws into ``ax`` when given (else a new figure) and returns the Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import rankdata

from milstudy.analysis.stats import seed_summary
from milstudy.plots_rank import attention_raster_maps, rank_measures_plot, scaling_plot, toy_matrix_panels  # noqa: F401,E501  (re-exported)
from milstudy.plots_intervals import (  # noqa: F401  (re-exported: plots is the one door for figures)
    VERDICT_COLOURS, chance_level, clip_interval, error_bar_label, forest_plot, grouped_intervals, interval_errorbar,
    mark_chance, metric_range,
)

ATTENTION_CMAP = "magma"
CONTOUR_COLOUR = "#00e5ff"
PALETTE = "colorblind"


def use_style() -> None:
    """Apply the house style (call once at the top of a notebook)."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight", "figure.autolayout": False,
        "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9, "legend.frameon": False,
        "image.cmap": ATTENTION_CMAP,
    })


def _axes(ax: Axes | None, figsize: tuple[float, float] = (5, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _head_mean(attention: Any) -> np.ndarray:
    a = np.asarray(attention.detach().cpu() if hasattr(attention, "detach") else attention, dtype=np.float64)
    return a.mean(axis=0) if a.ndim == 2 else a.reshape(-1)


def rank_percentile(values: Any) -> np.ndarray:
    """Per-slide rank percentile in [0, 1] of ``values [N]`` (or head-mean of ``[heads, N]``): the lowest value
    maps to 0, the highest to 1, ties share their average rank; a single value maps to 1."""
    v = _head_mean(values)
    if v.shape[0] == 1:
        return np.ones(1)
    return (rankdata(v, method="average") - 1.0) / (v.shape[0] - 1.0)


def attention_heatmap(
    thumbnail: np.ndarray,
    coords: np.ndarray,
    attention: Any,
    patch_size_level0: float,
    downsample: float,
    contour_mask: np.ndarray | None = None,
    ax: Axes | None = None,
    alpha: float = 0.6,
    title: str | None = None,
    colorbar: bool = True,
    scale: str = "rank",
    instance_labels: np.ndarray | None = None,
) -> Figure:
    """Attention on the slide thumbnail, rank-percentile (``scale="rank"``) or mass (``"mass"``: N·a on a fixed
    log scale, see :func:`attention_colour`) coloured, with the ground-truth contour.

    thumbnail: ``[h, w, 3]`` uint8/float image of the slide at ``downsample`` (level-0 px per thumbnail px);
    coords: ``[N, 2]`` level-0 (x, y) of each patch's top-left corner; attention: ``[N]`` or ``[heads, N]``
    (heads averaged); patch_size_level0: patch side in level-0 px; contour_mask: ``[H, W]`` bool tumour mask at any
    resolution covering the same extent as the thumbnail (drawn as a contour line); instance_labels ``[N]`` 0/1:
    the instance AUROC is written under the map (with the top-10 % attention share, :func:`attention_note`).
    """
    coords = np.asarray(coords)
    colour = attention_colour(attention, scale)
    if coords.shape != (colour.shape[0], 2):
        raise ValueError(f"coords must be [N, 2] with N={colour.shape[0]} (attention length), got {coords.shape}")
    fig, ax = _axes(ax, (5, 5))
    h, w = thumbnail.shape[:2]
    ax.imshow(thumbnail, extent=(0, w, h, 0))
    overlay = np.zeros((h, w, 4))
    cmap = plt.get_cmap(ATTENTION_CMAP)
    side = max(1, int(round(patch_size_level0 / downsample)))
    for (x, y), c in zip(coords / downsample, colour):
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = min(w, x0 + side), min(h, y0 + side)
        if x1 > max(x0, 0) and y1 > max(y0, 0):
            overlay[max(y0, 0):y1, max(x0, 0):x1] = (*cmap(c)[:3], alpha)
    ax.imshow(overlay, extent=(0, w, h, 0))
    if contour_mask is not None:
        mask = np.asarray(contour_mask, dtype=float)
        ys = np.linspace(0, h, mask.shape[0])
        xs = np.linspace(0, w, mask.shape[1])
        ax.contour(xs, ys, mask, levels=[0.5], colors=[CONTOUR_COLOUR], linewidths=1.2)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title)
    _annotate_map(ax, attention, instance_labels)
    if colorbar:
        _rank_colorbar(fig, ax, scale)
    return fig


def attention_grid_map(
    coords: np.ndarray,
    attention: Any,
    patch_size: float,
    instance_labels: np.ndarray | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    colorbar: bool = False,
    scale: str = "rank",
    annotate: bool = True,
) -> Figure:
    """Attention on the patch grid alone (no thumbnail), coloured by ``scale`` ("rank" or "mass", see
    :func:`attention_colour`); tumour patches outlined and, with ``annotate``, the instance AUROC and top-10 %
    attention share written under the map.

    coords: ``[N, 2]`` (x, y) of each patch (any unit); patch_size in the same unit; instance_labels ``[N]`` 0/1.
    """
    coords = np.asarray(coords, dtype=float)
    colour = attention_colour(attention, scale)
    if coords.shape != (colour.shape[0], 2):
        raise ValueError(f"coords must be [N, 2] with N={colour.shape[0]} (attention length), got {coords.shape}")
    fig, ax = _axes(ax, (4, 4))
    cells = np.round((coords - coords.min(axis=0)) / patch_size).astype(int)
    grid = np.full(cells.max(axis=0)[::-1] + 1, np.nan)
    grid[cells[:, 1], cells[:, 0]] = colour
    ax.imshow(grid, cmap=ATTENTION_CMAP, vmin=0, vmax=1, interpolation="nearest")
    if instance_labels is not None:
        from matplotlib.patches import Rectangle

        for x, y in cells[np.asarray(instance_labels).reshape(-1) > 0]:
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor=CONTOUR_COLOUR, linewidth=1.0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=9)
    if annotate:
        _annotate_map(ax, attention, instance_labels)
    if colorbar:
        _rank_colorbar(fig, ax, scale)
    return fig


MASS_RANGE = (1e-2, 1e2)  # N·a from 1/100 to 100 times uniform: the fixed colour range of scale="mass"


def attention_colour(attention: Any, scale: str = "rank") -> np.ndarray:
    """Colour values in [0, 1] of head-mean attention ``[N]``: ``"rank"``: the per-slide rank percentile
    (comparable ranks, blind to peakedness); ``"mass"``: log10(N·a) mapped linearly from MASS_RANGE to [0, 1]
    (0.5 = uniform attention, 1 = at least 100x uniform), the same scale for every slide and model, so a flat
    map is uniformly mid-coloured and a peaked one has a few bright patches on a dark slide."""
    if scale == "rank":
        return rank_percentile(attention)
    if scale != "mass":
        raise ValueError(f"scale must be 'rank' or 'mass', got {scale!r}")
    a = _head_mean(attention)
    low, high = np.log10(MASS_RANGE)
    return np.clip((np.log10(np.clip(a * a.shape[0], 1e-300, None)) - low) / (high - low), 0.0, 1.0)


def attention_note(attention: Any, instance_labels: Any | None = None) -> str:
    """"instance AUROC 0.91 · top 10 % of patches: 63 % of attention" for one slide (AUROC only with labels and
    both classes present): how well attention finds tumour, and how peaked it is."""
    from milstudy.analysis.localization import instance_auroc

    a = _head_mean(attention)
    k = max(1, int(np.ceil(0.1 * a.shape[0])))
    parts = [f"top 10 % of patches: {100 * np.sort(a)[::-1][:k].sum() / a.sum():.0f} % of attention"]
    if instance_labels is not None:
        auroc = instance_auroc(a / a.sum(), instance_labels)
        if np.isfinite(auroc):
            parts.insert(0, f"instance AUROC {auroc:.2f}")
    return " · ".join(parts)


def _annotate_map(ax: Axes, attention: Any, instance_labels: Any | None) -> None:
    ax.text(0.5, -0.02, attention_note(attention, instance_labels), transform=ax.transAxes, ha="center",
            va="top", fontsize=7)


def _rank_colorbar(fig: Figure, ax: Axes | list[Axes], scale: str = "rank") -> None:
    if scale == "mass":
        from matplotlib.colors import LogNorm

        mappable = plt.cm.ScalarMappable(cmap=ATTENTION_CMAP, norm=LogNorm(*MASS_RANGE))
        label = "attention × N (1 = uniform, log scale)"
    else:
        mappable = plt.cm.ScalarMappable(cmap=ATTENTION_CMAP, norm=plt.Normalize(0, 1))
        label = "attention rank percentile (per slide)"
    fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, label=label)


def attention_histograms(
    snapshots: Mapping[Any, Any], ax: Axes | None = None, bins: int = 30, title: str | None = None
) -> Figure:
    """Distribution of N·ā (attention relative to uniform, log10 axis) per snapshot, e.g. ``{epoch: attention [N]}``.

    A vertical line marks the uniform level N·ā = 1, the activation threshold of the sparsity measure.
    """
    fig, ax = _axes(ax, (5, 3.5))
    cmap = plt.get_cmap("viridis")
    keys = list(snapshots)
    values = {k: np.log10(np.clip(_head_mean(v) * _head_mean(v).shape[0], 1e-6, None)) for k, v in snapshots.items()}
    low = min(v.min() for v in values.values())
    high = max(v.max() for v in values.values())
    edges = np.linspace(low, high + 1e-9, bins + 1)
    for i, k in enumerate(keys):
        ax.hist(values[k], bins=edges, histtype="step", linewidth=1.4, density=True,
                color=cmap(i / max(1, len(keys) - 1)), label=str(k))
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("log10(N · attention)   (0 = uniform)")
    ax.set_ylabel("density")
    ax.legend(title="epoch", ncols=2)
    if title:
        ax.set_title(title)
    return fig


def metric_table_plot(
    table: pd.DataFrame,
    metric: str,
    group: str,
    hue: str | None = None,
    reference: Mapping[str, float] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    level: float = 0.95,
) -> Figure:
    """Bars of the mean of ``metric`` over rows (seeds) per ``group`` (and ``hue``) with the Student-t ``level``
    interval over seeds (:func:`milstudy.analysis.stats.seed_summary`; none for a single seed), clipped to the
    metric's range; the y label says what the bars are, AUC / C-index axes get a chance line, ``reference``
    marks the paper's value per group with a black tick."""
    import seaborn as sns

    if metric not in table or group not in table:
        raise ValueError(f"table needs columns {metric!r} and {group!r}; it has {list(table.columns)}")
    fig, ax = _axes(ax, (max(4, 0.9 * table[group].nunique() + 2), 3.5))
    order = list(dict.fromkeys(table[group]))
    bounds = metric_range(metric)

    def interval(values: pd.Series) -> tuple[float, float]:
        if len(values) < 2:
            return float(values.mean()), float(values.mean())
        summary = seed_summary(values, level, name=metric)
        return tuple(clip_interval(summary.ci_low, summary.ci_high, bounds))

    sns.barplot(data=table, x=group, y=metric, hue=hue, order=order, errorbar=interval, ax=ax, capsize=0.1)
    counts = table.groupby([group] + ([hue] if hue else []))[metric].count()
    ax.set_ylabel(f"{metric}\n({error_bar_label(counts.tolist(), level)})")
    if bounds is not None:
        ax.set_ylim(bounds[0], bounds[1] * 1.02)
    if reference:
        for i, name in enumerate(order):
            if name in reference and reference[name] is not None:
                ax.plot([i - 0.4, i + 0.4], [reference[name]] * 2, color="black", linewidth=2,
                        label="paper" if i == 0 else None)
    mark_chance(ax, metric)
    if reference or chance_level(metric) is not None:
        ax.legend()
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=20)
    if title:
        ax.set_title(title)
    return fig


def training_curves(
    history: pd.DataFrame,
    metrics: Sequence[str],
    x: str = "epoch",
    hue: str | None = None,
    axes: Sequence[Axes] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per metric, ``metric`` vs ``x`` (mean ± sd band over repeated rows, e.g. seeds), lines per ``hue``."""
    import seaborn as sns

    missing = [c for c in [x, *metrics, *([hue] if hue else [])] if c not in history]
    if missing:
        raise ValueError(f"history has no column(s) {missing}; it has {list(history.columns)}")
    if axes is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
        axes = list(axes[0])
    fig = axes[0].figure
    for i, (metric, ax) in enumerate(zip(metrics, axes)):
        sns.lineplot(data=history, x=x, y=metric, hue=hue, errorbar="sd", ax=ax, legend=(i == len(metrics) - 1))
        ax.set_title(metric)
        ax.set_ylabel("")
    if hue and axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def umap_scatter(
    embedding: np.ndarray,
    labels: np.ndarray,
    ax: Axes | None = None,
    title: str | None = None,
    label_names: Mapping[int, str] | None = None,
    point_size: float = 6.0,
) -> Figure:
    """2-D embedding ``[N, 2]`` coloured by ground-truth instance label ``[N]`` (e.g. 0 normal, 1 tumour)."""
    import seaborn as sns

    embedding = np.asarray(embedding)
    labels = np.asarray(labels).reshape(-1)
    if embedding.ndim != 2 or embedding.shape[1] != 2 or embedding.shape[0] != labels.shape[0]:
        raise ValueError(f"embedding must be [N, 2] and labels [N]; got {embedding.shape} and {labels.shape}")
    fig, ax = _axes(ax, (4, 4))
    colours = sns.color_palette(PALETTE)
    for i, value in enumerate(np.unique(labels)):
        keep = labels == value
        name = label_names.get(int(value), str(value)) if label_names else str(value)
        ax.scatter(embedding[keep, 0], embedding[keep, 1], s=point_size, alpha=0.7, color=colours[i % len(colours)],
                   label=f"{name} ({keep.sum()})", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def attention_evolution(
    snapshots: Mapping[str, Mapping[int, Any]],
    coords: np.ndarray,
    patch_size: float,
    instance_labels: np.ndarray | None = None,
    epochs: Sequence[int] | None = None,
    title: str | None = None,
    scale: str = "rank",
) -> Figure:
    """Rows = models, columns = epochs: grid maps of one slide's attention (``scale`` colours, tumour
    outlined), and a last column with the distribution of N·ā at those epochs (ABMILX paper Sec. 3.3 figure).

    snapshots: ``{model: {epoch: attention [heads, N] or [N]}}``; coords ``[N, 2]``; epochs: which to show
    (default: first, middle, last common epoch).
    """
    common = sorted(set.intersection(*[set(v) for v in snapshots.values()])) if snapshots else []
    if not common:
        raise ValueError("snapshots hold no epoch common to every model")
    if epochs is None:
        epochs = sorted({common[0], common[len(common) // 2], common[-1]})
    epochs = [e for e in epochs if e in common]
    n_rows, n_cols = len(snapshots), len(epochs) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.3 * n_cols + 1.5, 2.3 * n_rows), squeeze=False)
    for r, (model, by_epoch) in enumerate(snapshots.items()):
        for c, epoch in enumerate(epochs):
            attention_grid_map(coords, by_epoch[epoch], patch_size, instance_labels, ax=axes[r, c],
                               title=f"{model}\nepoch {epoch}" if c == 0 else f"epoch {epoch}", scale=scale)
        attention_histograms({e: by_epoch[e] for e in epochs}, ax=axes[r, -1])
        axes[r, -1].set_xlabel("log10(N·ā)" if r == n_rows - 1 else "")
        if r:
            axes[r, -1].get_legend().remove()
    colours = ("per-slide attention rank percentile" if scale == "rank" else
               "attention × N, log scale from 0.01 to 100 (mid = uniform)")
    fig.suptitle((title + "\n" if title else "") + f"grid colour: {colours} (bright = high); cyan: tumour patches",
                 fontsize=10)
    fig.tight_layout()
    return fig


def phase_diagram(
    summary: pd.DataFrame,
    value: str = "test_auc_mean",
    note: str | None = "collapsed_fraction",
    panel: str = "aggregator",
    x: str = "s",
    y: str = "witness_rate",
    vmin: float = 0.5,
    vmax: float = 1.0,
    title: str | None = None,
) -> Figure:
    """One heatmap per ``panel`` value of ``value`` over ``x`` (columns) x ``y`` (rows, largest at the top), each
    cell annotated with its value and, if ``note`` is given, "k% at chance" from that column (a fraction).

    ``summary``: e.g. :func:`milstudy.analysis.collapse.summarize_collapse`. Colours run from ``vmin`` (chance,
    dark) to ``vmax``.
    """
    missing = [c for c in (value, panel, x, y, *([note] if note else [])) if c not in summary]
    if missing:
        raise ValueError(f"summary lacks columns {missing}; it has {list(summary.columns)}")
    panels = list(dict.fromkeys(summary[panel]))
    xs, ys = sorted(summary[x].unique()), sorted(summary[y].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.1 * len(xs) * len(panels) + 2.2, 0.75 * len(ys) + 1.6),
                             squeeze=False)
    image = None
    for ax, name in zip(axes[0], panels):
        rows = summary[summary[panel] == name].set_index([y, x])
        grid = np.array([[rows[value].get((yy, xx), np.nan) for xx in xs] for yy in ys], dtype=float)
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i, yy in enumerate(ys):
            for j, xx in enumerate(xs):
                if np.isnan(grid[i, j]):
                    continue
                text = f"{grid[i, j]:.2f}"
                if note:
                    text += f"\n{100 * float(rows[note].get((yy, xx), np.nan)):.0f}% at chance"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(y if ax is axes[0][0] else "")
        ax.set_title(str(name))
        ax.grid(False)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02, label=value)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
