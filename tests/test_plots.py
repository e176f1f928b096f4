"""House-style figures: each draws without error; the heatmap colour scale is the per-slide rank percentile."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from milstudy import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    plots.use_style()
    yield
    plt.close("all")


def test_rank_percentile_hand_values():
    np.testing.assert_allclose(plots.rank_percentile([0.5, 0.1, 0.3, 0.1]), [1.0, 1 / 6, 2 / 3, 1 / 6])
    # invariant to any monotone transform (the point of the rank scale): raw and log attention give the same colours
    a = np.random.default_rng(0).dirichlet(np.full(30, 0.2))
    np.testing.assert_allclose(plots.rank_percentile(a), plots.rank_percentile(np.log(a + 1e-12)))
    # heads are averaged first
    np.testing.assert_allclose(plots.rank_percentile(np.array([[0.2, 0.8], [0.4, 0.6]])), [0.0, 1.0])
    assert plots.rank_percentile([0.7]).tolist() == [1.0]


def test_attention_heatmap_colours_patches_by_rank():
    thumbnail = np.full((40, 40, 3), 230, dtype=np.uint8)
    coords = np.array([[0, 0], [80, 0], [0, 80], [80, 80]])  # level-0, patch 80 px, downsample 4 -> 20 px cells
    attention = np.array([0.7, 0.1, 0.15, 0.05])
    mask = np.zeros((40, 40), dtype=bool)
    mask[:20, :20] = True
    fig = plots.attention_heatmap(thumbnail, coords, attention, patch_size_level0=80, downsample=4, contour_mask=mask)
    ax = fig.axes[0]
    overlay = ax.images[1].get_array()
    cmap = plt.get_cmap(plots.ATTENTION_CMAP)
    np.testing.assert_allclose(overlay[5, 5, :3], cmap(1.0)[:3])  # highest attention -> top of the scale
    np.testing.assert_allclose(overlay[25, 25, :3], cmap(0.0)[:3])  # lowest -> bottom
    np.testing.assert_allclose(overlay[25, 5, :3], cmap(2 / 3)[:3])
    assert len(ax.collections) >= 1  # the contour
    with pytest.raises(ValueError, match="coords must be"):
        plots.attention_heatmap(thumbnail, coords[:3], attention, 80, 4)


def test_other_figures_draw():
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 32
    attention = rng.dirichlet(np.ones(20), size=2)
    labels = (rng.random(20) < 0.3).astype(int)
    assert plots.attention_grid_map(coords, attention, 32, labels, colorbar=True).axes
    assert plots.attention_histograms({0: attention[0], 5: attention[1]}).axes
    table = pd.DataFrame({"model": ["a", "a", "b", "b"], "auc": [0.8, 0.9, 0.6, 0.7]})
    fig = plots.metric_table_plot(table, "auc", "model", reference={"a": 0.85})
    assert fig.axes[0].get_legend() is not None
    history = pd.DataFrame({"epoch": [0, 1, 0, 1], "risk": [0.5, 0.3, 0.6, 0.2], "model": ["a", "a", "b", "b"]})
    assert plots.training_curves(history, ["risk"], hue="model").axes
    assert plots.umap_scatter(rng.normal(size=(20, 2)), labels, label_names={0: "normal", 1: "tumour"}).axes
    with pytest.raises(ValueError, match="no column"):
        plots.training_curves(history, ["missing"])


def test_attention_evolution_panel():
    rng = np.random.default_rng(1)
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * 32
    snaps = {m: {e: rng.dirichlet(np.ones(12), size=2) for e in range(4)} for m in ("ABMIL", "ABMILX")}
    fig = plots.attention_evolution(snaps, coords, 32, instance_labels=(np.arange(12) < 3).astype(int))
    assert len(fig.axes) == 2 * 4  # 2 rows x (3 epochs + histogram)
    assert len(fig.axes[0].patches) == 3  # the tumour patches outlined
    with pytest.raises(ValueError, match="common"):
        plots.attention_evolution({"a": {0: snaps["ABMIL"][0]}, "b": {1: snaps["ABMIL"][1]}}, coords, 32)


# ------------------------------------------------------------------------------------ intervals and claims
def test_metric_table_plot_clips_labels_and_marks_chance():
    table = pd.DataFrame({"model": ["a"] * 5 + ["b"] * 5,
                          "test_auc": [0.99, 1.0, 0.97, 1.0, 0.92, 0.6, 0.5, 0.7, 0.55, 0.65]})
    ax = plots.metric_table_plot(table, "test_auc", "model").axes[0]
    assert "mean ± 95 % CI over 5 seeds" in ax.get_ylabel()
    bars = [line for line in ax.lines if not line.get_label().startswith("chance")]  # bar + caps, NaN-separated
    assert len(bars) == 2
    assert np.nanmax(bars[0].get_ydata()) == pytest.approx(1.0)  # model a's t-interval runs past 1 unclipped
    assert np.nanmax(bars[1].get_ydata()) == pytest.approx(0.6 + 2.7764451051977987 * np.std(
        [0.6, 0.5, 0.7, 0.55, 0.65], ddof=1) / np.sqrt(5))
    chance = [line for line in ax.lines if line.get_label() == "chance (0.5)"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5]


def test_interval_helpers():
    assert plots.error_bar_label(5) == "mean ± 95 % CI over 5 seeds"
    assert plots.error_bar_label([3, 5], 0.9) == "mean ± 90 % CI over 3-5 seeds"
    low, high = plots.clip_interval([-0.1, 0.4], [0.7, 1.2], "val_c_index")
    assert low.tolist() == [0.0, 0.4] and high.tolist() == [0.7, 1.0]
    assert plots.clip_interval([-3.0], [2.0], "risk")[0].tolist() == [-3.0]  # unbounded metric untouched
    assert plots.chance_level("test_auc_mean") == 0.5 and plots.chance_level("accuracy") is None


def test_forest_plot_of_a_claims_table():
    table = pd.DataFrame({"claim": ["A beats B", "A sparser than B"], "metric": ["auc", "sparsity"],
                          "difference": [0.1, -0.02], "ci_low": [0.05, -0.06], "ci_high": [0.15, 0.01],
                          "verdict_ci_low": [0.03, -0.08], "verdict_ci_high": [0.17, 0.03],
                          "verdict": ["supported", "inconclusive"], "level": [0.95, 0.95]})
    ax = plots.forest_plot(table).axes[0]
    ticks = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert ticks == {"A beats B [auc]": 1, "A sparser than B [sparsity]": 0}  # first claim on top
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.lines)  # the zero line
    thick = [line for line in ax.lines if line.get_linewidth() == 4]
    assert [list(line.get_xdata()) for line in thick] == [[0.05, 0.15], [-0.06, 0.01]]
    assert thick[0].get_color() == plots.VERDICT_COLOURS["supported"]
    assert {t.get_text() for t in ax.texts} == {"supported", "inconclusive"}
    assert "95 % CI" in ax.get_xlabel()
    with pytest.raises(ValueError, match="table lacks"):
        plots.forest_plot(table.drop(columns="verdict"))


def test_attention_mass_scale_shows_peakedness_and_auroc_is_written():
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 32
    labels = (np.arange(16) < 4).astype(int)
    flat = np.full(16, 1 / 16)
    np.testing.assert_allclose(plots.attention_colour(flat, "mass"), 0.5)  # uniform = mid-scale
    assert np.ptp(plots.rank_percentile(flat)) == 0
    peaked = np.r_[np.full(4, 0.24), np.full(12, 0.04 / 12)]
    colour = plots.attention_colour(peaked, "mass")
    assert colour[0] == pytest.approx((np.log10(0.24 * 16) + 2) / 4) and colour[-1] < 0.5
    ax = plots.attention_grid_map(coords, peaked, 32, labels, scale="mass", colorbar=True).axes[0]
    assert np.nanmax(ax.images[0].get_array()) == pytest.approx(colour[0])
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["instance AUROC 1.00 · top 10 % of patches: 48 % of attention"]
    assert "uniform" in ax.figure.axes[-1].get_ylabel()  # the mass colour bar
    with pytest.raises(ValueError, match="scale must be"):
        plots.attention_colour(flat, "log")


def test_grouped_intervals_dodges_groups_clips_bars_and_keeps_category_order():
    buckets = pd.Categorical(["short", "long", "short", "long"], categories=["short", "long"], ordered=True)
    summary = pd.DataFrame({"method": ["a", "a", "b", "b"], "bucket": buckets, "n_seeds": 5,
                            "auc_mean": [0.9, 0.95, 0.6, 0.5], "auc_low": [0.8, 0.85, 0.4, 0.3],
                            "auc_high": [1.0, 1.1, 0.8, 0.7]})
    ax = plots.grouped_intervals(summary, "bucket", "method", "auc").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["short", "long"]
    assert "mean ± 95 % CI over 5 seeds" in ax.get_ylabel()
    points = [line for line in ax.lines if line.get_marker() == "o"]
    assert [list(np.round(p.get_xdata(), 3)) for p in points] == [[-0.15, 0.85], [0.15, 1.15]]  # dodged
    caps = [line for line in ax.lines if line.get_marker() == "_"]
    assert max(np.max(c.get_ydata()) for c in caps) == pytest.approx(1.0)  # 1.1 clipped to AUC's range
    assert any(line.get_label() == "chance (0.5)" for line in ax.lines)
    with pytest.raises(ValueError, match="summary lacks"):
        plots.grouped_intervals(summary.drop(columns="auc_low"), "bucket", "method", "auc")


def test_toy_matrix_panels_print_every_value_of_the_fig5_grid():
    from milstudy.analysis.toy_matrices import fig5_matrices

    fig = plots.toy_matrix_panels(fig5_matrices())
    assert len(fig.axes) == 4
    alibi_texts = [t.get_text() for t in fig.axes[2].texts]
    assert len(alibi_texts) == 256 and alibi_texts[15] == "-4.24" and alibi_texts[0] == "0.00"
    assert sum(t.get_text() == "1" for t in fig.axes[0].texts) == 64  # HIPT 2 x 2 regions: 16 x 4 kept pairs
    with pytest.raises(ValueError, match="matrices is empty"):
        plots.toy_matrix_panels({})
