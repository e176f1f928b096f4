"""Study plumbing of notebooks 10/13: subsets, mean ± std, claims checked in code."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milstudy.papers.abmilx_study import (
    PAPER_E1,
    e1_claims,
    e1_table,
    mean_std,
    pick_tracked_slides,
    stratified_subset,
)
from milstudy.data.e2e_slides import toy_slides


def test_stratified_subset_keeps_every_split_label_group():
    manifest = pd.DataFrame({"slide_id": [f"s{i}" for i in range(40)], "split": ["train"] * 30 + ["test"] * 10,
                             "label": [0, 1] * 20})
    subset = stratified_subset(manifest, 12, seed=0)
    counts = subset.groupby(["split", "label"]).size()
    assert counts[("train", 0)] == counts[("train", 1)] == 4 and counts[("test", 0)] == counts[("test", 1)] == 2
    assert stratified_subset(manifest, None).equals(manifest)


def test_mean_std_formats_sample_sd_ddof1():
    frame = pd.DataFrame({"run": ["a", "a", "b"], "auc": [0.5, 0.7, 0.9]})
    out = mean_std(frame, "run", ["auc"]).set_index("run")
    assert out.loc["a", "auc"] == "0.600 ± 0.141" and out.loc["b", "auc_std"] == 0.0 and out.loc["a", "n"] == 2


def _summary(values):
    rows = []
    for run, (sparsity, auc, risk, risk_mh) in values.items():
        rows.append({"run": run, "seed": 0, "sparsity_all": sparsity, "sparsity_pos": sparsity, "test_auc": auc,
                     "gini": 0.1, "normalized_entropy": 0.9, "instance_auroc": 0.5, "risk": risk, "risk_mh": risk_mh,
                     "mass_on_tumour": 1.0 - risk})
    return mean_std(pd.DataFrame(rows), "run", [c for c in rows[0] if c not in ("run", "seed")])


def test_claims_follow_the_paper_ordering_when_our_numbers_do():
    paper_like = _summary({"ABMIL": (80, 0.89, 0.5, 0.5), "TransMIL": (13, 0.91, 0.2, 0.2),
                           "MHLA": (61, 0.915, 0.3, 0.25), "MHLA&A+ (α=1)": (29, 0.928, 0.2, 0.2),
                           "MHLA&A+ (learnable α)": (36, 0.94, 0.1, 0.1)})
    claims = e1_claims(paper_like)
    assert (claims["verdict"] == "holds").all(), claims
    reversed_ = _summary({"ABMIL": (10, 0.99, 0.1, 0.1), "TransMIL": (90, 0.5, 0.5, 0.5),
                          "MHLA": (61, 0.915, 0.3, 0.25), "MHLA&A+ (α=1)": (70, 0.928, 0.2, 0.2),
                          "MHLA&A+ (learnable α)": (36, 0.94, 0.1, 0.1)})
    verdicts = e1_claims(reversed_).set_index("claim")["verdict"]
    assert verdicts["ABMIL is sparser than ABMILX (learnable α)"] == "does not hold"
    assert verdicts["TransMIL is the least sparse of the five"] == "does not hold"
    table = e1_table(paper_like)
    assert list(table["model"]) == list(PAPER_E1["model"]) and "our_sparsity_all" in table


def test_pick_tracked_slides_takes_positive_median_witness_slides():
    slides = toy_slides(8, n_patches=16, size=8, seed=0)
    picked = pick_tracked_slides(slides, 2)
    assert len(picked) == 2 and all(s.instance_labels.sum() > 0 for s in picked)
    with pytest.raises(ValueError, match="no positive slide"):
        pick_tracked_slides([s for s in slides if s.target == 0])


def test_detection_slides_from_a_manifest_match_the_cohort(tmp_path):
    """A real-cohort manifest (relative paths under a slide root, masks as written by `data masks`) gives the same
    slides, splits and patch labels as the synthetic cohort it describes."""
    from milstudy.papers.abmilx_study import load_detection_slides, slide_thumbnail
    from milstudy.data.synthetic import cohort_for_profile

    cohort = cohort_for_profile("smoke", task="detection")
    frame = cohort.manifest.copy()
    frame["path"] = [str(Path(p).relative_to(cohort.root)) for p in frame["path"]]
    frame["mask_path"] = [str(Path(p).relative_to(cohort.root)) for p in frame["mask_path"]]
    frame.loc[0, "mask_path"] = ""  # a slide without a mask keeps instance_labels None
    manifest = tmp_path / "detection.csv"
    frame.to_csv(manifest, index=False)
    synthetic = load_detection_slides("smoke")
    real = load_detection_slides("paper", manifest=manifest, slide_root=cohort.root)
    for split in ("train", "val", "test"):
        assert [s.slide_id for s in real.splits[split]] == [s.slide_id for s in synthetic.splits[split]]
    first = str(frame.loc[0, "slide_id"])
    for ours, theirs in zip(sum(real.splits.values(), []), sum(synthetic.splits.values(), [])):
        if ours.slide_id == first:
            assert ours.instance_labels is None
        else:
            np.testing.assert_array_equal(ours.instance_labels, theirs.instance_labels)
    slide = next(s for s in real.splits["train"] if s.slide_id != first)
    thumbnail, downsample, mask = slide_thumbnail(real, slide, max_size=128)
    assert thumbnail.shape[2] == 3 and downsample > 1 and mask is not None and mask.dtype == bool
    with pytest.raises(ValueError, match="milstudy data masks"):
        load_detection_slides("paper")
