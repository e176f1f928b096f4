"""ASMIL stability metrics (specs/asmil.md §4.2): JSD identities and the per-epoch table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from milstudy.analysis.stability import jsd, late_instability, stability_table


def test_jsd_identities():
    p = np.array([0.7, 0.2, 0.1])
    assert jsd(p, p) == pytest.approx(0.0, abs=1e-12)
    assert jsd(p, p[::-1]) == pytest.approx(jsd(p[::-1], p))  # symmetric
    assert jsd([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2), abs=1e-6)  # disjoint supports: ln 2
    with pytest.raises(ValueError, match="shapes"):
        jsd([0.5, 0.5], [1.0, 0.0, 0.0])


def test_stability_table_sorts_epochs_and_compares_to_next_and_final():
    flat, peaked = np.full(4, 0.25), np.array([0.97, 0.01, 0.01, 0.01])
    snapshots = {3: {"s": peaked}, 1: {"s": flat}, 2: {"s": np.stack([flat, flat])}}  # unsorted; [heads, N] too
    table = stability_table(snapshots)
    assert table["epoch"].tolist() == [1, 2, 3]
    assert table["jsd_next"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert table["jsd_next"].iloc[1] == pytest.approx(jsd(flat, peaked)) and np.isnan(table["jsd_next"].iloc[2])
    assert table["jsd_final"].iloc[2] == pytest.approx(0.0, abs=1e-12)
    assert table["normalized_entropy"].iloc[0] == pytest.approx(1.0)


def test_late_instability_is_the_mean_over_the_second_half():
    rng = np.random.default_rng(0)
    stable = {e: {"a": np.full(5, 0.2)} for e in range(1, 9)}
    jumpy = {e: {"a": rng.dirichlet(np.ones(5))} for e in range(1, 9)}
    assert late_instability(stability_table(stable))["late_jsd"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    late = late_instability(stability_table(jumpy))
    assert late["late_jsd"].iloc[0] > 0.01 and {"early_jsd", "late_entropy"} <= set(late.columns)


def test_localization_scores_dice_specificity_and_success():
    from milstudy.analysis.localization import lesions, localization_scores

    coords = np.array([[0, 0], [256, 0], [512, 0], [1280, 0], [1536, 0]])
    labels = np.array([1, 1, 0, 0, 1])  # two lesions: tiles {0, 1} and {4}
    assert lesions(coords, labels).tolist() == [0, 0, -1, -1, 1]
    scores = np.array([1.0, 0.2, 0.0, 0.1, 0.9])  # tile 1 missed, both lesions hit
    out = localization_scores(scores, labels, coords)
    assert out["dice"] == pytest.approx(2 * 2 / (2 + 3)) and out["success"] == 0.0 and out["lesion_success"] == 1.0
    negative = localization_scores(np.array([0.0, 1.0, 0.2, 0.1, 0.3]), np.zeros(5))
    assert negative["specificity"] == pytest.approx(4 / 5) and np.isnan(negative["dice"])
