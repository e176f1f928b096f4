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


def _grid(n=5, stride=256):
    xs, ys = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], 1) * stride


def _slide(values: dict, lesion_tiles=(), n=5):
    coords = _grid(n)
    cells = coords // 256
    scores, labels = np.zeros(n * n), np.zeros(n * n, np.int64)
    for (x, y), v in values.items():
        scores[(cells[:, 0] == x) & (cells[:, 1] == y)] = v
    for x, y in lesion_tiles:
        labels[(cells[:, 0] == x) & (cells[:, 1] == y)] = 1
    return scores, labels, coords


def test_nms_detections_are_spaced_and_ordered():
    from milstudy.analysis.localization import detections

    scores, _, coords = _slide({(2, 2): 1.0, (2, 3): 0.9, (0, 0): 0.5})
    tiles, values = detections(scores, coords)
    cells = coords[tiles] // 256
    assert values[0] == 1.0 and tuple(cells[0]) == (2, 2)
    assert (2, 3) not in {tuple(c) for c in cells}  # suppressed by its neighbour
    assert values[1] == 0.5 and np.all(np.diff(values) <= 0)
    gaps = np.abs(cells[:, None] - cells[None]).max(-1) + np.eye(len(cells), dtype=int) * 9
    assert gaps.min() >= 2


def test_froc_by_hand():
    from milstudy.analysis.localization import froc

    tumour = _slide({(1, 1): 0.9, (4, 4): 1.0}, lesion_tiles=[(1, 1)])
    normal_with_fp = _slide({(2, 2): 1.0})
    normal_flat = _slide({})
    result = froc([tumour, normal_with_fp, normal_flat])
    # at the top threshold 2 false positives over 3 slides and no lesion; from 0.9 on the lesion is found; the FP
    # rate then reaches 0.667 before any further detection: sensitivity 0 at 0.25 and 0.5 FP/slide, 1 from 1 on
    assert result["n_lesions"] == 1 and result["n_slides"] == 3
    assert result["score"] == pytest.approx(4 / 6)
    perfect = froc([_slide({(1, 1): 1.0}, lesion_tiles=[(1, 1)]), normal_flat])
    assert perfect["score"] == 1.0


def test_froc_tolerance_and_one_count_per_lesion():
    from milstudy.analysis.localization import froc

    near = _slide({(2, 2): 1.0, (1, 1): 0.5}, lesion_tiles=[(1, 1)])  # (1, 1) is suppressed by (2, 2)
    assert froc([near], tolerance=1)["score"] == 1.0
    assert froc([near], tolerance=0)["score"] == 0.0
    big = _slide({(0, 0): 1.0, (0, 4): 1.0}, lesion_tiles=[(0, y) for y in range(5)])  # one lesion, two peaks
    result = froc([big])
    assert result["n_lesions"] == 1 and result["sensitivity"].max() == 1.0
    with pytest.raises(ValueError, match="at least one lesion"):
        froc([_slide({})])
