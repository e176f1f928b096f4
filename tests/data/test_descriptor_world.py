"""The S-vec world (milstudy.data.synthetic.descriptors): determinism, geometry, ground truth and the cues."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from milstudy.data.synthetic.descriptors import (ISUP, PATCH_PX, DescriptorWorld, descriptor_cohort, patch_classes,
                                                tissue_grid)

SMALL = dict(n_slides=24, n_patches=(300, 600))


def _slides(cohort):
    return [s for split in ("train", "val", "test") for s in cohort.splits[split]]


@pytest.fixture(scope="module")
def detection():
    return descriptor_cohort(DescriptorWorld(task="detection", **SMALL))


def test_same_world_same_slides_and_another_seed_other_slides(detection):
    again = descriptor_cohort(DescriptorWorld(task="detection", **SMALL))
    other = descriptor_cohort(DescriptorWorld(task="detection", seed=1, **SMALL))
    for a, b in zip(_slides(detection), _slides(again)):
        assert a.slide_id == b.slide_id and np.array_equal(a.main, b.main) and np.array_equal(a.low, b.low)
    assert not np.array_equal(_slides(detection)[0].main[:50], _slides(other)[0].main[:50])
    assert detection.world.digest() == again.world.digest() != other.world.digest()


def test_another_slide_seed_draws_other_slides_of_the_same_biology(detection):
    other = descriptor_cohort(DescriptorWorld(task="detection", **SMALL), slide_seed=99)
    assert all(np.array_equal(other.directions[k], detection.directions[k]) for k in detection.directions)
    assert not {s.slide_id for s in _slides(other)} & {s.slide_id for s in _slides(detection)}
    assert _slides(other)[0].slide_id.startswith("svec_detection_99_")
    assert not np.array_equal(_slides(other)[0].main[:50], _slides(detection)[0].main[:50])


def test_geometry_grid_sizes_and_the_low_scale_covers_the_main_scale(detection):
    for slide in _slides(detection):
        n = slide.n_main
        assert 150 <= n <= 600 and slide.main.shape == (n, 32) and slide.main.dtype == np.float32
        assert np.all(slide.coords % PATCH_PX == 0) and len(np.unique(slide.coords, axis=0)) == n
        low_of_main = {tuple(c) for c in (slide.coords // (2 * PATCH_PX)) * 2 * PATCH_PX}
        assert low_of_main == {tuple(c) for c in slide.low_coords}  # one low-scale patch per occupied 2 x 2 cell
        assert slide.low.shape == (len(slide.low_coords), 32) and n / 4 <= slide.n_low <= n


def test_tissue_grid_is_about_the_size_asked_for():
    rng = np.random.default_rng(0)
    sizes = [len(tissue_grid(n, rng)) for n in (500, 2000, 4000) for _ in range(5)]
    assert all(n // 2 <= size <= n for size, n in zip(sizes, np.repeat([500, 2000, 4000], 5)))


def test_detection_labels_splits_and_instance_ground_truth(detection):
    table = detection.table
    assert table["label"].sum() == 12 and set(table["split"]) == {"train", "val", "test"}
    assert all(set(group["label"]) == {0, 1} for _, group in table.groupby("split"))
    for slide in _slides(detection):
        share = slide.instance_labels.mean()
        if slide.target == 0:
            assert share == 0
        else:
            assert 0.02 * 0.9 - 1 / slide.n_main <= share <= 0.3 + 1 / slide.n_main


def test_cues_tumour_mimic_benign_along_the_tumour_direction():
    """Tumour patches sit ``signal`` along u_tumour, mimics ``mimic_overlap * signal``, benign patches at 0 (up to
    the stain offset); with sign_flip = 0.5 the tumour mean cancels but |projection| does not."""
    world = DescriptorWorld(task="detection", signal=3.0, stain_sd=0.0, mimic_rate=(0.1, 0.2), **SMALL)
    cohort = descriptor_cohort(world)
    u = cohort.directions["tumour"]
    proj = {"tumour": [], "benign": []}
    for slide in cohort.positives("train") + cohort.positives("test"):
        p = slide.main @ u
        proj["tumour"].append(p[slide.instance_labels == 1])
        proj["benign"].append(p[slide.instance_labels == 0])
    tumour, benign = np.concatenate(proj["tumour"]), np.concatenate(proj["benign"])
    assert abs(tumour.mean() - 3.0) < 0.1
    assert 0.05 < benign.mean() < 0.5  # mimics (10-20 % of the patches at 1.5) lift the benign mean above 0
    flipped = descriptor_cohort(replace(world, sign_flip=0.5))
    p = np.concatenate([s.main[s.instance_labels == 1] @ u for s in flipped.positives("train")])
    assert abs(p.mean()) < 0.3 and np.abs(p).mean() > 2.5


def test_subtyping_architecture_cue_is_stronger_at_the_low_scale():
    world = DescriptorWorld(task="subtyping", stain_sd=0.0, **SMALL)
    cohort = descriptor_cohort(world)
    table = cohort.table
    assert table["label"].sum() == round(0.2 * 24) and (table["witness_rate"] > 0).all()
    low_gap, main_gap = [], []
    for slide in _slides(cohort):
        sign = 1 if slide.target == 1 else -1
        cell = {tuple(c): i for i, c in enumerate(slide.low_coords)}
        owner = np.array([cell[tuple(c)] for c in (slide.coords // (2 * PATCH_PX)) * 2 * PATCH_PX])
        share = np.bincount(owner, slide.instance_labels, len(cell)) / np.bincount(owner, minlength=len(cell))
        low_gap.append(sign * (slide.low[share >= 0.5] @ cohort.directions["arch"]).mean())
        tumour = slide.main[slide.instance_labels == 1]
        main_gap.append(sign * (tumour @ cohort.directions["subtype"]).mean())
    assert np.mean(main_gap) == pytest.approx(world.subtype_main, abs=0.15)
    assert np.mean(low_gap) == pytest.approx(world.subtype_low, abs=0.2)  # low-scale tumour cells carry the arch cue


def test_grading_grades_follow_the_gleason_patterns():
    cohort = descriptor_cohort(DescriptorWorld(task="grading", **SMALL))
    table = cohort.table
    assert sorted(table["label"].unique()) == [0, 1, 2, 3, 4, 5]
    for _, row in table.iterrows():
        if row["label"] == 0:
            assert row["patterns"] == "" and row["witness_rate"] == 0
        else:
            primary, secondary = map(int, row["patterns"].split("+"))
            assert ISUP[(primary, secondary)] == row["label"]


def test_patch_classes_name_benign_mimic_tumour_and_the_gleason_pattern():
    """``patch_classes``: tumour patches (instance label 1) are class >= 2, mimics 1, the rest 0; under grading a
    slide's tumour classes are its Gleason patterns minus one, and mimics lie along their own cue."""
    world = DescriptorWorld(task="grading", mimic_rate=(0.05, 0.1), stain_sd=0.0, **SMALL)
    cohort = descriptor_cohort(world)
    mimic_proj, benign_proj = [], []
    for slide in _slides(cohort):
        classes = cohort.patch_classes[slide.slide_id]
        assert classes.shape == (slide.n_main,) and classes.dtype == np.int64
        assert np.array_equal(classes >= 2, slide.instance_labels == 1)
        assert (classes == 1).any()  # every slide has mimics at a 5-10 % share
        row = cohort.table.set_index("slide_id").loc[slide.slide_id]
        patterns = {int(p) - 1 for p in row["patterns"].split("+")} if row["patterns"] else set()
        assert set(np.unique(classes[classes >= 2]).tolist()) <= patterns
        mimic_proj.append(slide.main[classes == 1] @ cohort.directions["mimic"])
        benign_proj.append(slide.main[classes == 0] @ cohort.directions["mimic"])
    gap = np.concatenate(mimic_proj).mean() - np.concatenate(benign_proj).mean()
    expected = world.signal * np.sqrt(1 - world.mimic_overlap ** 2)
    assert gap == pytest.approx(expected, abs=0.15)
    assert patch_classes(np.array([0, 3, 5, 0]), np.array([True, False, False, False]),
                         np.array([False, True, True, False])).tolist() == [1, 2, 4, 0]
    assert patch_classes(np.zeros(2, np.int64), np.zeros(2, bool), np.array([True, False])).tolist() == [2, 0]


def test_survival_targets_censoring_share_and_burden_raises_the_hazard():
    world = DescriptorWorld(task="survival", n_slides=200, n_patches=(60, 120), censoring_rate=0.4,
                            survival_beta=3.0, survival_gamma=0.0)
    cohort = descriptor_cohort(world)
    table = cohort.table
    assert abs((1 - table["event"].mean()) - 0.4) < 0.05 and (table["time"] > 0).all()
    events = table[table["event"] == 1]
    high = events["witness_rate"] > events["witness_rate"].median()
    assert events.loc[high, "time"].median() < events.loc[~high, "time"].median()
    slide = cohort.splits["train"][0]
    assert isinstance(slide.target, tuple) and len(slide.target) == 2


@pytest.mark.parametrize("bad, match", [
    (dict(task="segmentation"), "task must be one of"),
    (dict(n_patches=(500, 100)), "n_patches"),
    (dict(witness_rate=(0.0, 0.2)), "witness_rate"),
    (dict(mimic_overlap=1.5), "mimic_overlap"),
    (dict(sign_flip=0.7), "sign_flip"),
    (dict(dim=8), "dim must be"),
    (dict(n_slides=4), "n_slides"),
    (dict(fractions=(0.5, 0.5, 0.5)), "fractions"),
])
def test_bad_knobs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        DescriptorWorld(**bad)
