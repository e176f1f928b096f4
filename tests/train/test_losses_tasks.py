"""Survival losses and binning (specs/abmilx.md §2.6, §6 invariant 16) and task behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.paths import REPO_ROOT
from milstudy.train.losses import assign_bins, cox_partial_nll, risk_from_hazards, survival_bins, survival_nll
from milstudy.train.tasks import ClassificationTask, GradingTask, SurvivalTask

UPSTREAM_FOLD = REPO_ROOT.parent / "shared" / "upstream_manifests" / "e2e_wsi_abmilx" / "survival_tcga_brca_3fold" / "fold_0.csv"


def test_survival_nll_hand_computation():
    logits = torch.tensor([[0.2, -0.5, 1.0], [0.3, 0.1, -0.4]])
    h = torch.sigmoid(logits).tolist()
    # slide 0: event in bin 1 -> -[log S_0 + log h_1] = -[log(1-h00) + log h01]
    uncensored = -(math.log(1 - h[0][0]) + math.log(h[0][1]))
    # slide 1: censored in bin 1 -> -log S_1 = -[log(1-h10) + log(1-h11)]
    censored = -(math.log(1 - h[1][0]) + math.log(1 - h[1][1]))
    loss = survival_nll(logits, torch.tensor([1, 1]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((uncensored + censored) / 2, rel=1e-6)
    # event in the first bin uses S_{-1} = 1
    first = survival_nll(logits[:1], torch.tensor([0]), torch.tensor([1.0]))
    assert first.item() == pytest.approx(-math.log(h[0][0]), rel=1e-6)


def test_survival_nll_fp32_and_clamped():
    logits = torch.tensor([[50.0, 50.0]], dtype=torch.float16)
    loss = survival_nll(logits, torch.tensor([1]), torch.tensor([0.0]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-5)
    with pytest.raises(ValueError, match="bin indices"):
        survival_nll(torch.zeros(1, 2), torch.tensor([2]), torch.tensor([1.0]))


def test_risk_monotone_in_hazards():
    base = torch.tensor([[-1.0, 0.0, 0.5, -0.3]])
    for k in range(4):
        higher = base.clone()
        higher[0, k] += 1.0
        assert risk_from_hazards(higher) > risk_from_hazards(base)


def _upstream_fold() -> pd.DataFrame:
    if not UPSTREAM_FOLD.is_file():
        pytest.skip(f"{UPSTREAM_FOLD} is absent (shared/ is not beside the clone)")
    return pd.read_csv(UPSTREAM_FOLD)


def test_binning_reproduces_upstream_labels():
    table = _upstream_fold()
    assert len(table) == 1007
    edges = survival_bins(table["Event"], table["Status"], n_bins=4)
    np.testing.assert_allclose(edges[1:-1], [24.32, 42.68, 79.0], atol=0.01)
    assert edges[0] == table["Event"].min() and edges[-1] == table["Event"].max()
    np.testing.assert_array_equal(assign_bins(table["Event"], edges), table["Label"].to_numpy())
    task = SurvivalTask.from_cohort(list(zip(table["Event"], table["Status"])))
    np.testing.assert_allclose(task.bin_edges, edges)


def test_bins_left_closed_and_train_only_edges():
    edges = np.array([0.0, 10.0, 20.0, 30.0])
    np.testing.assert_array_equal(assign_bins([0.0, 9.99, 10.0, 20.0, 30.0, 99.0, -1.0], edges), [0, 0, 1, 2, 2, 2, 0])
    task = SurvivalTask(n_bins=2).prepare([(1.0, 1), (2.0, 1), (3.0, 1), (10.0, 0)])
    np.testing.assert_allclose(task.bin_edges, [1.0, 2.0, 10.0])
    with pytest.raises(ValueError, match="uncensored"):
        survival_bins([1.0, 2.0], [1, 0], n_bins=4)


def test_cox_partial_likelihood_hand_computation_with_ties():
    r = torch.tensor([0.5, -0.2, 1.0, 0.0])
    t = torch.tensor([2.0, 2.0, 5.0, 1.0])
    e = torch.tensor([1.0, 1.0, 0.0, 1.0])
    x = r.tolist()
    risk_set_t2 = math.log(sum(math.exp(v) for v in (x[0], x[1], x[2])))  # t_j >= 2 (Breslow: ties included)
    risk_set_t1 = math.log(sum(math.exp(v) for v in x))
    expected = -((x[0] - risk_set_t2) + (x[1] - risk_set_t2) + (x[3] - risk_set_t1)) / 3
    assert cox_partial_nll(r, t, e).item() == pytest.approx(expected, rel=1e-6)
    zero = cox_partial_nll(r.requires_grad_(), t, torch.zeros(4))
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("loss_name", ["nll", "cox"])
def test_survival_losses_decrease_on_toy_data(loss_name):
    torch.manual_seed(0)
    n = 64
    x = torch.randn(n, 3)
    time = torch.exp(-1.5 * x[:, 0] + 0.1 * torch.randn(n)) * 10
    event = (torch.rand(n) < 0.7).float()
    targets = torch.stack([time, event], 1)
    task = SurvivalTask(loss=loss_name).prepare(targets.tolist())
    head = torch.nn.Linear(3, task.n_out)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss = task.loss(head(x), targets)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    c = task.metrics(task.predict(head(x)), targets)["c_index"]
    assert c > 0.8  # the learned risk ranks the short survivors first


def test_classification_task_labels_and_errors():
    task = ClassificationTask(["benign", "malignant"])
    assert task.n_out == 2 and task.primary_metric == "auc"
    assert task.make_targets(["malignant", "benign"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"slide s7: label 'normal' is not one of the task's classes"):
        task.make_targets(["benign", "normal"], ["s1", "s7"])
    with pytest.raises(ValueError, match="label 3"):
        ClassificationTask(2).prepare([0, 1, 3])
    weighted = ClassificationTask(2, class_weights="balanced").prepare([0, 0, 0, 1])
    np.testing.assert_allclose(weighted.class_weights, [4 / 6, 4 / 2])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    metrics = task.metrics(task.predict(logits), torch.tensor([0, 1, 1, 1]))
    assert metrics["accuracy"] == 0.75 and metrics["auc"] == 1.0


def test_grading_task_reports_qwk_and_accuracy_is_primary():
    task = GradingTask(n_grades=4)
    assert task.n_out == 4 and task.primary_metric == "accuracy"
    logits = torch.eye(4)[[0, 1, 2, 2]] * 5
    metrics = task.metrics(task.predict(logits), torch.tensor([0, 1, 2, 3]))
    assert metrics["accuracy"] == 0.75 and 0 < metrics["qwk"] < 1


def test_survival_task_targets_and_prediction():
    task = SurvivalTask(bin_edges=[0, 5, 10, 20])
    targets = task.make_targets([torch.tensor([3.0, 1.0]), (12.0, 0), {"survival_months": 6, "event": 1}])
    assert targets.tolist() == [[3.0, 1.0], [12.0, 0.0], [6.0, 1.0]]
    assert task.target_columns(targets)["bin"].tolist() == [0, 2, 1]
    assert set(task.predict(torch.zeros(3, 3))) == {"risk", "survival"}
    with pytest.raises(ValueError, match="slide b: event 2.0"):
        task.make_targets([(1.0, 1), (2.0, 2)], ["a", "b"])
    with pytest.raises(ValueError, match="loss must be"):
        SurvivalTask(loss="hinge")
