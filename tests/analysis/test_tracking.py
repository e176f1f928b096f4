"""The per-epoch attention tracker on a tiny end-to-end run (toy cohort, ABMILX with A+ and MHLA)."""

import numpy as np
import pytest
import torch

from milstudy.analysis.tracking import AttentionTracker, track_two_stage
from milstudy.data.bags import Bag
from milstudy.models import build_model
from milstudy.data.e2e_slides import toy_slides
from milstudy.train.e2e import E2EConfig, train_e2e
from milstudy.train.tasks import ClassificationTask


def test_tracker_records_every_epoch_and_lambda_matches_the_model():
    slides = toy_slides(6, n_patches=16, size=16, seed=0)
    positives = [s for s in slides if s.instance_labels.sum() > 0][:2]
    tracker = AttentionTracker(positives, run="abmilx", seed=0)
    config = E2EConfig(aggregator="abmilx", aggregator_kwargs={"dim": 16, "heads": 4}, epochs=2, s=8,
                       ratio=float("inf"), batch_slides=2, device="cpu", snapshot_slides=[positives[0].slide_id])
    result = train_e2e({"train": slides}, ClassificationTask([0, 1]), config, callbacks=[tracker], keep_model=True)
    rec = tracker.records
    assert sorted(rec.slides["epoch"].unique()) == [1, 2]  # epochs are 1-based
    assert {"sparsity", "risk", "risk_mh", "mass_on_tumour", "instance_auroc", "run", "seed"} <= set(rec.slides)
    assert (rec.slides["risk_mh"] <= rec.slides["risk_max_head"] + 1e-12).all()
    # Λ rows: one per (epoch, slide, head); α read from the model; Eq. 17: â_i' Λ = the model's refined attention
    assert len(rec.modulation) == 2 * 2 * 4
    alpha = float(result.model.aggregator.alpha.detach())
    assert rec.modulation["alpha"].iloc[-1] == pytest.approx(alpha)
    last = rec.modulation[rec.modulation["epoch"] == 2]
    for _, row in last.iterrows():
        attention = rec.attention[2][row["slide_id"]]
        assert row["attn_after"] == pytest.approx(float(attention[row["head"], row["noise_index"]]), rel=1e-4)
    # the trainer's own snapshot agrees with the tracker's attention
    np.testing.assert_allclose(result.attention_snapshots[2][positives[0].slide_id], rec.attention[2][positives[0].slide_id],
                               atol=1e-6)


def test_two_stage_tracking_without_attn_plus_has_no_lambda_rows():
    torch.manual_seed(0)
    model = build_model("mhla", 8, 2, dim=8, heads=2)
    y = np.array([0, 1, 0, 0, 1, 0])
    bags = [Bag(torch.randn(6, 8), "s0", 1, instance_labels=torch.as_tensor(y)), Bag(torch.randn(5, 8), "s1", 0)]
    rec = track_two_stage(model, bags, epoch=3, run="mhla")
    assert list(rec.slides["positive"]) == [True, False]
    assert rec.modulation.empty
    assert np.isnan(rec.slides.loc[1, "risk"]) and rec.slides.loc[0, "run"] == "mhla"
