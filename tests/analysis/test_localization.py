"""Instance AUROC and top-k precision on hand cases (spec abmilx §4.2 "Localization")."""

import numpy as np
import pytest

from milstudy.analysis.localization import cohort_localization, instance_auroc, top_k_precision


def test_hand_auroc_and_top_k():
    a = np.array([0.4, 0.1, 0.3, 0.2])
    y = np.array([1, 0, 0, 1])
    # pairs (tumour, normal): (0.4>0.1) (0.4>0.3) (0.2>0.1) (0.2<0.3) -> 3/4
    assert instance_auroc(a, y) == pytest.approx(0.75)
    # k = 2 tumour patches; the top-2 are patches 0 (tumour) and 2 (normal)
    assert top_k_precision(a, y) == pytest.approx(0.5)
    assert top_k_precision(a, y, k=1) == pytest.approx(1.0)


def test_perfect_and_reversed_rankings():
    y = np.array([0, 0, 1, 1, 0])
    perfect = np.array([0.05, 0.05, 0.4, 0.4, 0.1])
    assert instance_auroc(perfect, y) == 1.0 and top_k_precision(perfect, y) == 1.0
    reversed_ = np.array([0.3, 0.3, 0.05, 0.05, 0.3])
    assert instance_auroc(reversed_, y) == 0.0 and top_k_precision(reversed_, y) == 0.0


def test_cohort_skips_negative_slides_and_single_class_is_nan():
    table = cohort_localization([np.full(3, 1 / 3), np.array([0.5, 0.5])], [np.zeros(3), np.ones(2)])
    assert len(table) == 1 and np.isnan(table.loc[0, "instance_auroc"])
