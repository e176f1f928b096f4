"""Synthetic cohorts: determinism, manifest schema, ground truth vs tiling, survival censoring, reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milstudy.data.slides import open_slide
from milstudy.data.synthetic import SyntheticCohortConfig, build_cohort, instance_labels, load_cohort
from milstudy.data.synthetic.cohort import _survival
from milstudy.data.tiling import tile_slide

SMALL = dict(n_slides=4, size_range=(512, 640), witness_rate_range=(0.08, 0.3))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    config = SyntheticCohortConfig(task="subtyping", seed=1, **SMALL)
    return build_cohort(config, root=tmp_path_factory.mktemp("c1"), progress=False, n_workers=1)


def test_manifest_schema_and_files(cohort):
    m = cohort.manifest
    for column in ("slide_id", "case_id", "path", "label", "grade", "survival_months", "event", "report",
                   "split", "mask_path", "witness_rate", "subtype", "n_foci"):
        assert column in m.columns, column
    assert m["slide_id"].is_unique and set(m["split"]) <= {"train", "val", "test"}
    for _, row in m.iterrows():
        slide = open_slide(cohort.slide_path(row))
        assert slide.level_count >= 3 and slide.mpp == pytest.approx(0.5)
        assert cohort.mask(row).shape == (-(-slide.dimensions[1] // 8), -(-slide.dimensions[0] // 8))
    on_disk = pd.read_csv(cohort.root / "manifest.csv")
    assert not on_disk["path"].str.startswith("/").any()  # relative to the cohort root
    assert (cohort.root / "COMPLETE").exists()


def test_same_seed_same_pixels_and_manifest_other_seed_differs(cohort, tmp_path):
    again = build_cohort(cohort.config, root=tmp_path / "again", progress=False, n_workers=1)
    cols = [c for c in cohort.manifest.columns if c not in ("path", "mask_path")]
    pd.testing.assert_frame_equal(cohort.manifest[cols], again.manifest[cols])
    a = open_slide(cohort.slide_path(0)).read_level(1)
    b = open_slide(again.slide_path(0)).read_level(1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cohort.label_map(0), again.label_map(0))
    other = build_cohort(SyntheticCohortConfig(task="subtyping", seed=2, **SMALL), root=tmp_path / "other",
                         progress=False, n_workers=1)
    assert not np.array_equal(other.label_map(0), cohort.label_map(0))


def test_instance_labels_agree_with_mask(cohort):
    row = cohort.manifest.iloc[0]
    slide = open_slide(cohort.slide_path(row))
    grid = tile_slide(slide, 2.0, 16, min_tissue=0.2)
    fraction, label = instance_labels(row, grid.coords, grid.size_level0)
    tumour = cohort.mask(row)
    for (x, y), f in zip(grid.coords, fraction):
        assert f == pytest.approx(tumour[y // 8 : (y + 64) // 8, x // 8 : (x + 64) // 8].mean(), abs=1e-6)
    np.testing.assert_array_equal(label, (fraction >= 0.5).astype(int))
    assert label.sum() > 0  # every subtyping slide has tumour
    fraction2, _ = instance_labels(tumour, grid.coords, grid.size_level0, mask_downsample=8)
    np.testing.assert_allclose(fraction, fraction2)
    with pytest.raises(ValueError, match="bool"):
        instance_labels(tumour.astype(np.uint8), grid.coords, 64, 8)


def test_tumour_nuclei_are_darker_than_normal_tissue(cohort):
    row = cohort.manifest.iloc[0]
    image = open_slide(cohort.slide_path(row)).read_level(0).astype(float).mean(axis=2)
    label = np.kron(cohort.label_map(row), np.ones((8, 8), np.uint8))[: image.shape[0], : image.shape[1]]
    assert image[label >= 2].mean() < image[label == 1].mean() - 5


def test_detection_negatives_have_no_tumour_and_cache_is_reused(tmp_path):
    config = SyntheticCohortConfig(task="detection", seed=0, **SMALL)
    first = build_cohort(config, root=tmp_path / "d", progress=False, n_workers=1)
    m = first.manifest
    assert sorted(m["label"].tolist()) == [0, 0, 1, 1]
    for _, row in m.iterrows():
        assert first.mask(row).any() == bool(row["label"])
    stamp = (tmp_path / "d" / "manifest.csv").stat().st_mtime_ns
    assert load_cohort(tmp_path / "d").manifest.equals(build_cohort(config, root=tmp_path / "d").manifest)
    assert (tmp_path / "d" / "manifest.csv").stat().st_mtime_ns == stamp


def test_half_built_cohort_is_resumed(tmp_path):
    config = SyntheticCohortConfig(task="grading", seed=0, **{**SMALL, "n_slides": 3})
    full = build_cohort(config, root=tmp_path / "g", progress=False, n_workers=1)
    (tmp_path / "g" / "COMPLETE").unlink()
    (tmp_path / "g" / "slides" / "syn-grad-0001.tiff").unlink()
    rebuilt = build_cohort(config, root=tmp_path / "g", progress=False, n_workers=1)
    assert (tmp_path / "g" / "slides" / "syn-grad-0001.tiff").exists()
    pd.testing.assert_frame_equal(full.manifest, rebuilt.manifest)


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.8])
def test_survival_censoring_is_calibrated_and_hazard_follows_burden(rate):
    config = SyntheticCohortConfig(task="survival", n_slides=4000, censoring_rate=rate)
    rng = np.random.default_rng(0)
    rows = [{"witness_rate": w, "subtype": int(s), "grade": -1}
            for w, s in zip(rng.uniform(0.005, 0.3, 4000), rng.uniform(size=4000) < 0.2)]
    plans = [{"survival_unit_exp": e, "censor_u": u} for e, u in zip(rng.exponential(size=4000), rng.uniform(size=4000))]
    months, event = _survival(config, rows, plans)
    assert 1 - event.mean() == pytest.approx(rate, abs=0.01)
    burden = np.array([r["witness_rate"] for r in rows])
    high, low = burden > 0.2, burden < 0.05
    assert event[high].mean() > event[low].mean()  # higher hazard: events observed earlier, more often


def test_reports_are_templated_and_some_are_missing(tmp_path):
    config = SyntheticCohortConfig(task="subtyping", seed=0, **{**SMALL, "n_slides": 6, "report_missing_rate": 0.5})
    m = build_cohort(config, root=tmp_path / "r", progress=False, n_workers=1).manifest
    assert (m["report"] == "").any() and (m["report"] != "").any()
    for _, row in m[m["report"] != ""].iterrows():
        expected = "lobular" if row["subtype"] == 1 else "ductal|no special type"
        assert pd.Series([row["report"].lower()]).str.contains(expected).item()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="task"):
        SyntheticCohortConfig(task="segmentation")
    with pytest.raises(ValueError, match="witness_rate_range"):
        SyntheticCohortConfig(witness_rate_range=(0.5, 0.1))
