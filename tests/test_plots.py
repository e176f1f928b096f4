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
