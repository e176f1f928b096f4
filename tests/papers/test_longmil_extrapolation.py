"""LongMIL extrapolation study (milstudy.papers.longmil_extrapolation): the length split (spec §4.3, §6.12), the
study run on a tiny motif world, bucket metrics, the ANOVA and the claims."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milstudy.data.synthetic.motif_bags import MotifWorld, motif_cohort
from milstudy.papers import longmil_extrapolation as le
from milstudy.train.two_stage import TrainConfig


# ------------------------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("n", [10, 11, 97, 200])
def test_split_is_ordered_by_length_and_shares_hold(n):
    rng = np.random.default_rng(n)
    lengths = rng.integers(100, 5000, n)
    labels = np.arange(n) % 2
    split = le.length_extrapolation_split(lengths, val_share=0.2, heldout_share=0.1, labels=labels)
    parts = np.concatenate([split[k] for k in ("train", "val", "heldout", "mid", "test")])
    assert sorted(parts.tolist()) == list(range(n))  # a partition: no bag twice, none lost
    short = np.concatenate([split[k] for k in ("train", "val", "heldout")])
    assert lengths[short].max() <= lengths[split["mid"]].min() <= lengths[split["test"]].min()
    assert abs(len(short) - 0.6 * n) <= 1 and abs(len(split["test"]) - 0.2 * n) <= 1
    assert set(labels[split["val"]]) == {0, 1}  # stratified carve


def test_split_ties_and_the_spec_assertion():
    lengths = np.array([5, 5, 5, 5, 5, 9, 9, 9, 9, 9])
    split = le.length_extrapolation_split(lengths, val_share=0.2)
    assert lengths[split["train"]].max() <= lengths[split["test"]].min()
    assert set(split["test"]) == {8, 9}  # ties broken by index, largest 20 %


def test_split_refuses_bad_shares():
    with pytest.raises(ValueError, match="train_share"):
        le.length_extrapolation_split(np.arange(10), train_share=0.9, test_share=0.2)
    with pytest.raises(ValueError, match="val_share"):
        le.length_extrapolation_split(np.arange(10), val_share=0.6, heldout_share=0.5)
    with pytest.raises(ValueError, match="lengths"):
        le.length_extrapolation_split([3, 4])


# ------------------------------------------------------------------------------------------------- methods
def test_methods_share_one_width_and_variants_change_one_knob():
    methods = le.study_methods(le.StudyDesign(width=32))
    assert list(methods) == list(le.METHODS)
    widths = {name: kw.get("dim", kw.get("hidden_dim")) for name, (_, kw) in methods.items()}
    assert set(widths.values()) == {32}
    variants = le.longmil_variants("radius", [2, 10])
    assert {k: v[1]["radius"] for k, v in variants.items()} == {"r=2": 2, "r=10": 10}
    with pytest.raises(ValueError, match="axis"):
        le.longmil_variants("dropout", [0.1])
    with pytest.raises(ValueError, match="unknown method"):
        le.study_methods(names=["ABMIL", "DSMIL"])


# ---------------------------------------------------------------------------------------------- study run
@pytest.fixture(scope="module")
def tiny():
    cohort = motif_cohort(MotifWorld(n_bags=30, length_knots=((0.0, 100), (0.6, 200), (1.0, 600))))
    split = le.length_extrapolation_split(cohort.lengths, val_share=0.2, heldout_share=0.2,
                                          labels=cohort.table["target"].to_numpy())
    methods = le.study_methods(le.StudyDesign(width=16), ["ABMIL", "FSA + RoPE", "Abs. PE", "LongMIL"])
    config = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, device="cpu", quiet=True)
    return cohort, le.run_extrapolation(cohort, split, methods, [0, 1], config, progress=False)


def test_study_returns_one_prediction_per_method_seed_and_scored_slide(tiny):
    cohort, result = tiny
    scored = sum(len(result.split[k]) for k in ("heldout", "mid", "test"))
    assert len(result.predictions) == 4 * 2 * scored
    assert list(result.predictions.columns) == ["method", "seed", "slide_id", "split", "bucket", "target", "prob_1",
                                                "prediction", "n_instances"]
    ids = cohort.table["slide_id"].to_numpy()
    train_ids = set(ids[result.split["train"]]) | set(ids[result.split["val"]])
    assert not train_ids & set(result.predictions["slide_id"])  # no training or selection slide is scored
    assert set(result.predictions.loc[result.predictions["split"] == "test", "slide_id"]) == set(
        ids[result.split["test"]])
    assert result.predictions["prob_1"].between(0, 1).all()
    assert len(result.per_seed) == 8
    assert {"test_auc", "test_f1_macro", "heldout_auc", "auc_drop"} <= set(result.per_seed)
    np.testing.assert_allclose(result.per_seed["auc_drop"],
                               result.per_seed["heldout_auc"] - result.per_seed["test_auc"])


def test_study_in_worker_processes_gives_the_serial_numbers():
    import torch

    cohort = motif_cohort(MotifWorld(n_bags=24, length_knots=((0.0, 100), (0.6, 200), (1.0, 400))))
    split = le.length_extrapolation_split(cohort.lengths, val_share=0.2, heldout_share=0.2,
                                          labels=cohort.table["target"].to_numpy())
    methods = le.study_methods(le.StudyDesign(width=16), ["ABMIL", "Abs. PE"])
    config = TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0, device="cpu", quiet=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = le.run_extrapolation(cohort, split, methods, [0], config, progress=False)
        parallel = le.run_extrapolation(cohort, split, methods, [0], config, progress=False, workers=2)
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(serial.predictions, parallel.predictions)
    pd.testing.assert_frame_equal(serial.per_seed.drop(columns="wall_time_s"),
                                  parallel.per_seed.drop(columns="wall_time_s"))


def test_absolute_pe_table_covers_the_training_grids_and_test_positions_clamp(tiny):
    cohort, result = tiny
    extent = le.grid_extent(cohort, result.split["train"])
    assert extent < le.grid_extent(cohort, result.split["test"])
    clamped = result.per_seed.loc[result.per_seed["method"] == "Abs. PE", "clamped_share"]
    assert (clamped > 0).all() and (clamped < 1).all()


def test_bucket_metrics_are_in_length_order_and_match_a_direct_score(tiny):
    from milstudy.train import metrics as M

    _, result = tiny
    buckets = le.bucket_metrics(result.predictions)
    order = list(buckets["bucket"].cat.categories)
    assert order[0].startswith("train lengths") and order[-1].startswith("top 20 % (2/2)") and len(order) == 4
    medians = buckets.groupby("bucket", observed=True)["n_median"].first().to_numpy()
    assert np.all(np.diff(medians) > 0)
    row = buckets.iloc[0]
    frame = result.predictions[(result.predictions["bucket"] == row["bucket"])
                               & (result.predictions["method"] == row["method"])
                               & (result.predictions["seed"] == row["seed"])]
    assert row["f1_macro"] == pytest.approx(M.f1(frame["target"], frame["prediction"]))
    summary = le.bucket_summary(buckets)
    assert len(summary) == 4 * len(order) and (summary["f1_macro_low"] <= summary["f1_macro_mean"]).all()


def test_anova_and_claims(tiny):
    _, result = tiny
    anova = le.anova_across_methods(result.per_seed, "test_f1_macro")
    assert anova["n_methods"] == 4 and anova["n_seeds"] == 2 and (np.isnan(anova["p"]) or 0 <= anova["p"] <= 1)
    claims = le.extrapolation_claims(result, n_resamples=200)
    assert "TransMIL" not in " ".join(claims["claim"])  # claims of absent methods are dropped
    assert set(claims["verdict"]) <= {"supported", "contradicted", "inconclusive"} and len(claims) == 4
    with pytest.raises(ValueError, match="column"):
        le.anova_across_methods(result.per_seed, "test_qwk")


def test_anova_matches_scipy_on_known_groups():
    from scipy.stats import f_oneway

    per_seed = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                             "test_f1_macro": [0.5, 0.6, 0.55, 0.8, 0.85, 0.9]})
    out = le.anova_across_methods(per_seed)
    assert out["p"] == pytest.approx(f_oneway([0.5, 0.6, 0.55], [0.8, 0.85, 0.9]).pvalue) and out["p"] < 0.01


def test_calibration_scores_abmil_on_training_lengths_and_a_strong_cue_is_learnt():
    config = TrainConfig(epochs=3, lr=2e-3, warmup_epochs=0, device="cpu", quiet=True)
    table = le.calibrate_contact_cue([0.0, 4.0], seeds=(0,), config=config, n_bags=60, width=16,
                                     world_seeds=(le.CALIBRATION_SEED,))
    assert list(table["contact_cue"]) == [0.0, 4.0] and (table["n_runs"] == 1).all()
    assert table.loc[1, "auc_mean"] >= 0.9  # a strong single-tile cue: ABMIL learns it on the toy world
    assert table["chosen"].sum() <= 1 and not table.loc[~table["in_band"], "chosen"].any()
    with pytest.raises(ValueError, match="config"):
        le.calibrate_contact_cue([0.5])
