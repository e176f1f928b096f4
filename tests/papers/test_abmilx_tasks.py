"""ABMILX E5 across tasks on the S-vec tier (milstudy.papers.abmilx_tasks): matched encoders, a disjoint
pre-training cohort, one row and one prediction set per (setting, seed), the same numbers in worker processes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.analysis.claims import claims_table
from milstudy.data.synthetic.descriptors import DescriptorWorld, descriptor_cohort
from milstudy.papers import abmilx_tasks as e5
from milstudy.papers.svec import svec_config
from milstudy.train.e2e import build_e2e_model
from milstudy.train.two_stage import TrainConfig

TINY = DescriptorWorld(task="survival", n_slides=16, n_patches=(40, 60), seed=3)


def test_weak_encoder_is_the_init_an_e2e_run_of_that_seed_starts_from():
    config = svec_config(TINY, "abmilx", seed=4)
    e2e_encoder = build_e2e_model(config, 4).encoder
    for a, b in zip(e5.weak_encoder(TINY, 4).state_dict().values(), e2e_encoder.state_dict().values()):
        torch.testing.assert_close(a, b)
    other = e5.weak_encoder(TINY, 5).state_dict()
    assert not torch.equal(next(iter(other.values())), next(iter(e2e_encoder.state_dict().values())))


def test_strong_encoder_is_pretrained_on_a_disjoint_cohort_and_separates_patch_classes(monkeypatch):
    """The pre-training cohort has the world's cue directions but another slide seed (no compared slide in it), and
    its encoder separates mimics from tumour on the compared cohort better than the random init does."""
    from milstudy.analysis.embedding import knn_purity
    from milstudy.data.synthetic import descriptors

    world = replace(TINY, task="detection", n_patches=(200, 300), mimic_rate=(0.1, 0.15), signal=1.5)
    drawn = []
    original = descriptors.descriptor_cohort
    monkeypatch.setattr(descriptors, "descriptor_cohort",
                        lambda w, slide_seed=None: drawn.append((w, slide_seed)) or original(w, slide_seed))
    strong = e5.strong_encoder(world, seed=1, n_slides=16, epochs=3)
    assert [(w.seed, w.n_slides, k) for w, k in drawn] == [(world.seed, 16, e5.STRONG_SEED_OFFSET + 1)]
    cohort = original(world)
    pretraining = original(replace(world, n_slides=16), e5.STRONG_SEED_OFFSET + 1)
    compared_ids = {s.slide_id for split in cohort.splits.values() for s in split}
    assert not compared_ids & {s.slide_id for split in pretraining.splits.values() for s in split}
    assert not np.array_equal(cohort.splits["train"][0].main[:20], pretraining.splits["train"][0].main[:20])
    slides = cohort.positives("train") + cohort.positives("test")
    x = torch.as_tensor(np.concatenate([s.main for s in slides]))
    classes = np.concatenate([cohort.patch_classes[s.slide_id] for s in slides])
    keep = classes > 0  # mimic vs tumour: what the shared cue hides from a random encoder
    with torch.no_grad():
        purity = {name: knn_purity(enc(x).numpy()[keep], classes[keep], k=10)
                  for name, enc in (("weak", e5.weak_encoder(world, 1)), ("strong", strong))}
    assert purity["strong"] > purity["weak"] + 0.05, purity


@pytest.fixture(scope="module")
def tiny_runs():
    cohort = descriptor_cohort(TINY)
    base = svec_config(TINY, "abmilx", 0, s=16, epochs=1)
    two_stage = TrainConfig(epochs=1, lr=1e-3, device="cpu", quiet=True)
    kwargs = dict(aggregators={"ABMIL": ("abmil", {}), "ABMILX": ("abmilx", {"dim": 16, "heads": 2})},
                  two_stage_aggregators=["ABMIL"], e2e_config=base, two_stage_config=two_stage,
                  strong_kwargs={"n_slides": 16, "epochs": 1}, progress=False)
    serial = e5.run_e5_task(TINY, cohort.splits, cohort.task, [0, 1], workers=1, **kwargs)
    return cohort, kwargs, serial


def test_one_row_and_one_prediction_set_per_setting_and_seed(tiny_runs):
    cohort, kwargs, (runs, predictions) = tiny_runs
    methods = [e5.method_name(s, "ABMIL") for s in e5.SETTINGS] + [e5.method_name(e5.SETTINGS[0], "ABMILX")]
    assert sorted(zip(runs["run"], runs["seed"])) == sorted((m, k) for m in methods for k in (0, 1))
    assert set(zip(runs["setting"], runs["aggregator"])) == {tuple(m.split(" · ")) for m in methods}
    assert runs["test_c_index"].between(0, 1).all()
    test_ids = sorted(s.slide_id for s in cohort.splits["test"])
    for (method, seed), group in predictions.groupby(["method", "seed"]):
        assert sorted(group["slide_id"]) == test_ids and (group["split"] == "test").all()
        assert {"time", "event", "risk"} <= set(group.columns)
    claims = e5.e5_claims("survival", "c_index", "ABMIL") + e5.e5_claims("survival", "c_index", "ABMILX", "ABMIL")
    table = claims_table(claims, predictions=predictions, n_resamples=200)
    assert len(table) == 4 and table["n_seeds"].eq(2).all()
    with pytest.raises(ValueError, match="not among aggregators"):
        e5.run_e5_task(TINY, cohort.splits, cohort.task, [0], **{**kwargs, "two_stage_aggregators": ["TransMIL"]})


def test_worker_processes_give_the_serial_numbers(tiny_runs):
    cohort, kwargs, (runs, predictions) = tiny_runs
    runs_w, predictions_w = e5.run_e5_task(TINY, cohort.splits, cohort.task, [0, 1], workers=2, **kwargs)
    columns = [c for c in runs if c.startswith(("test_", "val_")) or c in ("run", "seed", "best_epoch")]
    pd.testing.assert_frame_equal(runs_w[columns], runs[columns])
    pd.testing.assert_frame_equal(predictions_w, predictions)


def test_e5_claims_follow_the_sign_of_the_paper_gap():
    subtyping = e5.e5_claims("subtyping", "auc", "ABMIL")  # E2E 93.97 < UNI 94.05: the remaining gap
    assert (subtyping[1].method_a, subtyping[1].method_b) == ("two-stage, strong features · ABMIL",
                                                              "E2E, weak init · ABMIL")
    grading = e5.e5_claims("grading", "accuracy", "ABMILX", "ABMIL")  # E2E 78.34 > UNI 74.69
    assert (grading[1].method_a, grading[1].method_b) == ("E2E, weak init · ABMILX",
                                                          "two-stage, strong features · ABMIL")
    assert grading[0].method_b == "two-stage, weak features · ABMIL" and grading[0].metric == "accuracy"
    assert grading[0].statement.startswith("E2E + ABMILX from the weak init beats two-stage ABMIL on weak features")
    with pytest.raises(ValueError, match="task_name must be one of"):
        e5.e5_claims("staging", "auc", "ABMIL")


def test_e5_table_scores_each_task_by_its_metric(tiny_runs):
    _, _, (runs, _) = tiny_runs
    both = pd.concat([runs.assign(task="survival", metric="c_index"),
                      runs.assign(task="grading", metric="accuracy", test_accuracy=0.5, test_auc=0.6)])
    table = e5.e5_table(both).set_index(["task", "setting", "aggregator"])
    assert len(table) == 2 * 4 and table["n"].eq(2).all()
    survival = table.loc[("survival", "E2E, weak init", "ABMILX")]
    expected = runs.loc[runs["run"] == "E2E, weak init · ABMILX", "test_c_index"]
    assert survival["score_mean"] == pytest.approx(expected.mean())
    assert survival["score_std"] == pytest.approx(expected.std(ddof=1))
    assert survival["test_auc"] == "" and table.loc[("grading", "E2E, weak init", "ABMIL"), "test_auc"] == "0.600 ± 0.000"
    assert table.loc[("grading", "two-stage, strong features", "ABMIL"), "paper (Table 6)"] == "74.69 (PANDA accuracy, %)"
