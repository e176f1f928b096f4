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


def _per_seed(values, n_seeds=5, noise=0.005):
    """Per (run, seed) rows around the given means (small seed noise, same on every run: paired differences)."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(n_seeds):
        jitter = rng.normal(0, noise)
        for run, (sparsity, auc, risk, risk_mh) in values.items():
            jitter += rng.normal(0, noise / 5)  # a little of each run's own, so paired differences vary
            rows.append({"run": run, "seed": seed, "sparsity_all": sparsity * (1 + jitter), "test_auc": auc + jitter,
                         "risk": risk + jitter, "risk_mh": risk_mh + jitter, "mass_on_tumour": 1.0 - risk + jitter})
    return pd.DataFrame(rows)


def test_e1_claims_are_a_claims_table_with_the_papers_direction():
    paper_like = _per_seed({"ABMIL": (80, 0.89, 0.5, 0.5), "TransMIL": (13, 0.91, 0.2, 0.2),
                            "MHLA": (61, 0.915, 0.3, 0.25), "MHLA&A+ (α=1)": (29, 0.928, 0.2, 0.2),
                            "MHLA&A+ (learnable α)": (36, 0.94, 0.1, 0.1)})
    claims = e1_claims(paper_like)
    assert len(claims) == 10 and (claims["verdict"] == "supported").all(), claims[["claim", "verdict"]]
    assert claims.set_index("claim").loc["ABMIL is sparser than MHLA", "paper"] == "80 vs 61 (sparsity, %)"
    reversed_ = _per_seed({"ABMIL": (10, 0.99, 0.1, 0.1), "TransMIL": (90, 0.5, 0.5, 0.5),
                           "MHLA": (61, 0.915, 0.3, 0.25), "MHLA&A+ (α=1)": (70, 0.928, 0.2, 0.2),
                           "MHLA&A+ (learnable α)": (36, 0.94, 0.1, 0.1)})
    verdicts = e1_claims(reversed_).set_index("claim")["verdict"]
    assert verdicts["ABMIL is sparser than ABMILX (learnable α)"] == "contradicted"
    assert verdicts["TransMIL is less sparse than ABMIL"] == "contradicted"
    noisy = _per_seed({"ABMIL": (80, 0.90, 0.5, 0.5), "MHLA&A+ (learnable α)": (79, 0.90, 0.5, 0.5)}, noise=0.001)
    noisy["test_auc"] += np.random.default_rng(1).normal(0, 0.1, len(noisy))  # seed spread >> the difference
    assert e1_claims(noisy).set_index("claim").loc["ABMILX (learnable α) beats ABMIL", "verdict"] == "inconclusive"
    table = e1_table(mean_std(paper_like.assign(sparsity_pos=paper_like["sparsity_all"], gini=0.1,
                                                normalized_entropy=0.9, instance_auroc=0.5), "run",
                              ["sparsity_all", "sparsity_pos", "test_auc", "gini", "normalized_entropy",
                               "instance_auroc"]))
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


def test_e1_abmil_is_the_upstream_layout_at_the_common_width():
    import torch

    from milstudy.models import build_model
    from milstudy.papers.abmilx import e1_aggregators

    name, kwargs = e1_aggregators(64, 4)["ABMIL"]
    model = build_model(name, 32, 2, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert name == "abmil_upstream" and len(norms) >= 2  # LN on the input and before the classifier
    assert any(m.out_features == 64 for m in linears) and all(m.bias is None for m in linears[:-1])
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in model.modules())
