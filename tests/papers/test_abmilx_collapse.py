"""The collapse phase diagram: toy cohort knobs, splits, the grid's bookkeeping, the summary and the figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import torch
import pytest

from milstudy.analysis.collapse import summarize_collapse
from milstudy.papers.abmilx_collapse import PhaseCohort, _witness_mass, collapse_grid, phase_splits
from milstudy.analysis.sampling_noise import p_no_witness_without_replacement
from milstudy.plots import phase_diagram
from milstudy.data.e2e_slides import toy_slides
from milstudy.train.e2e import E2EConfig


def test_toy_contrast_blends_the_witness_tint():
    full = toy_slides(2, n_patches=16, witness_rate=0.25, contrast=1.0)[1]
    none = toy_slides(2, n_patches=16, witness_rate=0.25, contrast=0.0)[1]
    half = toy_slides(2, n_patches=16, witness_rate=0.25, contrast=0.5)[1]
    witness = full.instance_labels.astype(bool)
    assert witness.sum() == 4
    assert (full.main[witness] == np.array([230, 40, 40], np.uint8)).all()
    np.testing.assert_array_equal(none.main[~witness], full.main[~witness])  # same noise outside the witnesses
    assert none.main[witness].min() >= 90 and none.main[witness].max() < 160  # contrast 0: plain noise
    expected = np.rint(0.5 * none.main[witness].astype(np.float32) + 0.5 * np.array([230, 40, 40], np.float32))
    np.testing.assert_array_equal(half.main[witness], expected.astype(np.uint8))
    with pytest.raises(ValueError, match="contrast"):
        toy_slides(2, contrast=1.5)
    with pytest.raises(ValueError, match="witness_rate"):
        toy_slides(2, witness_rate=0.0)


def test_phase_splits_are_disjoint_and_balanced():
    splits = phase_splits(0.1, PhaseCohort(n_slides=24, n_patches=16))
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 12, "val": 4, "test": 8}
    ids = [s.slide_id for v in splits.values() for s in v]
    assert len(set(ids)) == 24
    for slides in splits.values():
        assert sum(s.target for s in slides) * 2 == len(slides)
    with pytest.raises(ValueError, match="no test slides"):
        phase_splits(0.1, PhaseCohort(n_slides=6, fractions=(0.6, 0.3, 0.1)))


def test_witness_mass_by_hand():
    slides = toy_slides(4, n_patches=4, witness_rate=0.5)  # slides 1 and 3 are positive, 2 witnesses each
    attention = {}
    for slide in slides:
        a = np.array([0.1, 0.2, 0.3, 0.4])
        attention[slide.slide_id] = np.stack([a, a[::-1]])  # two heads: head mean is uniform
    assert _witness_mass(attention, slides) == pytest.approx(0.5)
    attention[slides[1].slide_id] = np.where(slides[1].instance_labels, 0.5, 0.0)[None]
    assert _witness_mass(attention, slides) == pytest.approx((1.0 + 0.5) / 2)
    assert np.isnan(_witness_mass({}, slides))


def test_collapse_grid_rows_and_exact_bookkeeping():
    cohort = PhaseCohort(n_slides=12, n_patches=16, patch_size=16)
    base = E2EConfig(encoder="tiny_cnn", encoder_kwargs={"widths": (8, 16, 32, 64)}, epochs=1, lr=1e-3,
                     warmup_epochs=0, batch_slides=2, device="cpu", rrc_scale_min=1.0)
    configs = {"ABMIL": E2EConfig(**{**base.to_dict(), "aggregator": "abmil"}),
               "Mean pooling": E2EConfig(**{**base.to_dict(), "aggregator": "mean_pooling"})}
    frame = collapse_grid(configs, [0.25], [4, 16], [0], cohort, chance_auc=0.6, progress=False)
    assert len(frame) == 4 and set(frame["aggregator"]) == set(configs)
    assert (frame["n_tumour"] == 4).all()
    for _, row in frame.iterrows():
        assert row["p_no_witness"] == pytest.approx(p_no_witness_without_replacement(16, 4, row["s"]))
        assert row["collapsed"] == (row["test_auc"] < 0.6)
        assert 0.0 <= row["witness_mass"] <= 1.0
    mean_rows = frame[frame["aggregator"] == "Mean pooling"]
    np.testing.assert_allclose(mean_rows["witness_mass"], 4 / 16)  # uniform weights: mass = witness share
    assert frame.loc[frame["s"] == 16, "p_no_witness"].eq(0.0).all()  # s = N sees every patch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the spawned workers run one thread each; compare at the same setting
    try:
        serial = collapse_grid(configs, [0.25], [4, 16], [0], cohort, progress=False)
        parallel = collapse_grid(configs, [0.25], [4, 16], [0], cohort, progress=False, workers=2)
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(serial.drop(columns="wall_time_s"), parallel.drop(columns="wall_time_s"))
    with pytest.raises(ValueError, match="chance_auc"):
        collapse_grid(configs, [0.25], [4], [0], cohort, chance_auc=0.4, progress=False)


def test_summary_and_phase_diagram():
    frame = pd.DataFrame({
        "aggregator": ["A"] * 4 + ["B"] * 4, "witness_rate": [0.1, 0.1, 0.3, 0.3] * 2, "s": [8] * 8,
        "seed": [0, 1] * 4, "n_tumour": [2, 2, 5, 5] * 2, "test_auc": [0.5, 0.9, 1.0, 1.0, 0.5, 0.5, 0.8, 0.6],
        "collapsed": [True, False, False, False, True, True, False, False], "witness_mass": [0.2] * 8,
        "p_no_witness": [0.3, 0.3, 0.05, 0.05] * 2,
    })
    summary = summarize_collapse(frame)
    a = summary[(summary["aggregator"] == "A") & (summary["witness_rate"] == 0.1)].iloc[0]
    assert a["test_auc_mean"] == pytest.approx(0.7) and a["test_auc_std"] == pytest.approx(0.2828427, abs=1e-6)  # sample sd (ddof=1)
    assert a["collapsed_fraction"] == 0.5 and a["seeds"] == 2
    fig = phase_diagram(summary)
    assert len(fig.axes) == 3  # two panels and the colour bar
    with pytest.raises(ValueError, match="lacks columns"):
        phase_diagram(summary.drop(columns="collapsed_fraction"))
