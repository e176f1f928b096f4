"""A real cohort's feature bags for the LongMIL extrapolation study (milstudy.papers.longmil_cohorts): read from a
manifest and h5 bags, binary (3 classes need ``positive``), coordinates required; the study runs on it with each
bag's own grid step, and the absolute-PE table covers the positions the models see."""

import h5py
import numpy as np
import pandas as pd
import pytest

from milstudy.papers import longmil_extrapolation as le
from milstudy.papers.longmil_cohorts import manifest_cohort
from milstudy.train.two_stage import TrainConfig

LABELS = ["benign", "atypical", "malignant"]


def _cohort(tmp_path, labels, stride=512, coords=True):
    """Bags of 12..69 tiles on a grid of ``stride`` level-0 units, offset from the origin (as real slides are)."""
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        n = 12 + 3 * i
        x = rng.normal(size=(n, 6)).astype(np.float32)
        x[:3, 0] += 3.0 * (label == "malignant")
        with h5py.File(features / f"s{i}.h5", "w") as handle:
            handle.create_dataset("features", data=x)
            if coords:
                cells = np.stack([np.arange(n) % 7, np.arange(n) // 7], -1)
                handle.create_dataset("coords", data=cells * stride + np.array([10_000, 4_096]))
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(labels))], "label_3": labels}).to_csv(manifest, index=False)
    return manifest, features


def test_a_three_class_cohort_is_read_binary_with_positive_and_lengths_come_from_the_bags(tmp_path):
    labels = [LABELS[i % 3] for i in range(20)]
    manifest, features = _cohort(tmp_path, labels)
    cohort = manifest_cohort(manifest, features, "label_3", LABELS, positive=["malignant"])
    assert list(cohort.table["target"]) == [int(label == "malignant") for label in labels]
    assert list(cohort.lengths) == [12 + 3 * i for i in range(20)] and cohort.stride is None
    # the positions the models see: (coords - the bag's min) / its own step, so the table needs 7 columns
    assert le.grid_extent(cohort, range(20)) == max(7, int(np.ceil(69 / 7)))
    assert int(le.grid_cells(cohort, 0).min()) == 0


def test_more_than_two_classes_without_positive_and_bags_without_coordinates_are_refused(tmp_path):
    manifest, features = _cohort(tmp_path, [LABELS[i % 3] for i in range(9)])
    with pytest.raises(ValueError, match=r"m\.csv.*binary: pass positive"):
        manifest_cohort(manifest, features, "label_3", LABELS)
    other = tmp_path / "other"
    other.mkdir()
    manifest, features = _cohort(other, ["benign", "malignant"] * 3, coords=False)
    with pytest.raises(ValueError, match=r"slide 's0' has no patch coordinates"):
        manifest_cohort(manifest, features, "label_3", LABELS, positive=["malignant"])


def test_the_extrapolation_study_runs_on_a_real_cohort_with_per_bag_grid_steps(tmp_path):
    labels = ["benign", "malignant"] * 10
    manifest, features = _cohort(tmp_path, labels, stride=224)
    cohort = manifest_cohort(manifest, features, "label_3", LABELS, positive=["malignant"])
    split = le.length_extrapolation_split(cohort.lengths, val_share=0.25, labels=cohort.table["target"].to_numpy())
    design = le.StudyDesign(width=8, radius=2.0, stride=cohort.stride)
    methods = le.study_methods(design, ["ABMIL", "Abs. PE", "LongMIL"])
    assert methods["LongMIL"][1]["stride"] is None
    result = le.run_extrapolation(cohort, split, methods, [0], TrainConfig(epochs=1, device="cpu", quiet=True),
                                  progress=False)
    assert set(result.per_seed["method"]) == {"ABMIL", "Abs. PE", "LongMIL"}
    assert result.per_seed["test_f1_macro"].notna().all()
    clamped = result.per_seed.set_index("method").loc["Abs. PE", "clamped_share"]
    assert 0.0 < clamped <= 1.0  # the longest bags reach grid rows beyond the training bags' table
