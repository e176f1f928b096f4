"""The one loop (``milstudy.train.loop.fit``): a third, toy step plugs in without editing it; hooks, selection,
early stopping, non-finite losses, frozen parameters; coordinates and targets reach the model on every path."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from milstudy.data.bags import Bag, BagListDataset
from milstudy.data.e2e_slides import toy_slides
from milstudy.models.base import MILModel, MILOutput, _REGISTRY, register_model
from milstudy.train import loop
from milstudy.train.e2e import E2EConfig, train_e2e
from milstudy.train.loop import EvalResult, LoopConfig, StepLoss, fit
from milstudy.train.tasks import ClassificationTask
from milstudy.train.two_stage import TrainConfig, seed_everything, train_two_stage


# ------------------------------------------------------------------------------------- a third, toy step
class LinearRegressionTask:
    """A minimal task (not one of milstudy's): mean squared error, monitored as "neg_mse" (higher is better)."""

    primary_metric = "neg_mse"

    def metric_mode(self, name: str) -> str:
        return "min" if "loss" in name else "max"


class PointStep:
    """Fits y = w x on fixed points: full-batch steps, validation on other points. Knows nothing of bags."""

    def __init__(self, val_scores: list[float] | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1, bias=False)
        self.task, self.device, self.ema_decay = LinearRegressionTask(), torch.device("cpu"), None
        self.x = torch.linspace(-1, 1, 16)[:, None]
        self.y = 3.0 * self.x
        self.val_scores = val_scores  # scripted validation values, to test selection and stopping
        self.calls = 0

    def prepare(self, state): pass

    def batches(self, state):
        yield self.x[::2], self.y[::2]
        yield self.x[1::2], self.y[1::2]

    def loss(self, batch, state) -> StepLoss:
        x, y = batch
        return StepLoss(((state.model(x) - y) ** 2).mean(), 0.0, len(x))

    def describe(self, batch) -> str:
        return f"{len(batch[0])} points"

    def end_epoch(self, state) -> dict[str, Any]:
        return {"points": 16}

    def evaluate(self, split, model, with_attention) -> EvalResult | None:
        if split != "val":
            return None
        with torch.no_grad():
            mse = float(((model(self.x) - self.y) ** 2).mean())
        value = -mse if self.val_scores is None else self.val_scores[min(self.calls, len(self.val_scores) - 1)]
        self.calls += 1
        return EvalResult(mse, {"neg_mse": value}, pd.DataFrame({"slide_id": ["all"], "split": [split]}))

    def snapshot(self, model):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_fit_names_no_step_class():
    source = inspect.getsource(loop.fit)
    for name in ("BagStep", "E2EStep", "PointStep", "two_stage", "e2e"):
        assert name not in source


def test_a_new_step_trains_through_fit_unchanged():
    step = PointStep()
    result = fit(step, LoopConfig(epochs=40, lr=0.1, warmup_epochs=0, schedule="constant", quiet=True, device="cpu"))
    assert float(step.model.weight.detach()) == pytest.approx(3.0, abs=0.05)
    assert list(result.history["epoch"]) == list(range(1, 41))  # 1-based
    assert result.history["points"].eq(16).all()  # the step's own history column
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    assert result.test_metrics is None and result.best_epoch >= 30


def test_selection_and_early_stopping_rule():
    # scripted validation values: best at epoch 2; epochs 3-4 tie it (a tie is no improvement), so with
    # patience 2 training stops after epoch 4 once min_epochs (3) have run
    step = PointStep(val_scores=[0.1, 0.5, 0.5, 0.5, 0.9, 0.9])
    config = LoopConfig(epochs=6, lr=0.01, patience=2, min_epochs=3, quiet=True, device="cpu")
    result = fit(step, config)
    assert len(result.history) == 4 and result.stopped_early
    assert result.best_epoch in (2, 3, 4)  # equal values: the lower validation loss wins, never the counter
    # min_epochs holds the stop back
    late = fit(PointStep(val_scores=[0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
               LoopConfig(epochs=7, lr=0.01, patience=1, min_epochs=5, quiet=True, device="cpu"))
    assert len(late.history) == 5


def test_non_finite_loss_stops_with_an_error_naming_the_batch():
    class Exploding(PointStep):
        def loss(self, batch, state):
            return StepLoss(torch.tensor(float("nan"), requires_grad=True), 0.0, 1)

    with pytest.raises(FloatingPointError, match=r"epoch 1: the loss is nan on 8 points"):
        fit(Exploding(), LoopConfig(epochs=2, quiet=True, device="cpu"))


def test_only_trainable_parameters_reach_the_optimizer():
    step = PointStep()
    frozen = nn.Linear(1, 1)
    frozen.requires_grad_(False)
    step.model = nn.Sequential(step.model, frozen)
    before = frozen.weight.detach().clone()
    seen = []
    original = loop.build_optimizer
    loop.build_optimizer = lambda params, config: seen.append(list(params)) or original(seen[-1], config)
    try:
        fit(step, LoopConfig(epochs=1, weight_decay=0.5, quiet=True, device="cpu"))
    finally:
        loop.build_optimizer = original
    assert all(p.requires_grad for p in seen[0]) and len(seen[0]) == 1
    torch.testing.assert_close(frozen.weight, before, rtol=0, atol=0)  # weight decay never touched it


# -------------------------------------------------------------------------- hooks, coords, targets reach models
class Strict(MILModel):
    """Fails when the loop forgets ``coords`` (any path) or ``targets`` (training); counts the hook calls."""

    needs_targets = True

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.score = nn.Linear(in_dim, 1)
        self.head = nn.Linear(in_dim, n_out)
        self.steps, self.epochs = 0, []

    def forward(self, x, coords=None, mask=None, targets=None):
        if coords is None:
            raise AssertionError("coords did not reach the model")
        if coords.shape[:2] != x.shape[:2]:
            raise AssertionError(f"coords {tuple(coords.shape)} do not match x {tuple(x.shape)}")
        if self.training and targets is None:
            raise AssertionError("targets did not reach the model in training")
        logits = self.score(x).squeeze(-1)
        weights = torch.softmax(logits, dim=1)
        return MILOutput(self.head((weights.unsqueeze(-1) * x).sum(1)), weights[:, None])

    def after_optimizer_step(self) -> None:
        self.steps += 1

    def on_epoch_end(self, epoch: int) -> None:
        self.epochs.append(epoch)


STRICT = "test_loop_strict"


@pytest.fixture
def strict_registered():
    """``Strict`` in the zoo for one test only (registered at import time it would join the zoo-wide model tests
    whenever this module is collected first)."""
    register_model(STRICT)(lambda in_dim, n_out, **kw: Strict(in_dim, n_out))
    yield STRICT
    _REGISTRY.pop(STRICT, None)


def test_two_stage_passes_coords_and_targets_and_calls_the_hooks():
    rng = np.random.default_rng(0)
    bags = [Bag(features=torch.from_numpy(rng.normal(size=(5, 4)).astype(np.float32)), slide_id=f"b{i}",
                target=i % 2, coords=torch.arange(10).view(5, 2)) for i in range(8)]
    seed_everything(0)
    model = Strict(4, 2)
    train_two_stage(model, ClassificationTask(2), BagListDataset(bags[:6]), BagListDataset(bags[6:]),
                    config=TrainConfig(epochs=3, quiet=True, device="cpu", snapshot_slides=("b6",)))
    assert model.steps == 3 * 6 and model.epochs == [1, 2, 3]


@pytest.mark.parametrize("sampler", ["mris", "attention", "regional"])
def test_e2e_passes_coords_and_targets_and_calls_the_hooks(sampler, strict_registered):
    slides = toy_slides(6, n_patches=16, size=16, seed=0)
    config = E2EConfig(encoder_kwargs={"widths": (4, 8, 8, 16)}, aggregator=STRICT, s=8, ratio=4, epochs=2,
                       batch_slides=2, device="cpu", sampler=sampler)
    result = train_e2e({"train": slides[:4], "val": slides[4:]}, ClassificationTask(2), config, keep_model=True)
    aggregator = result.model.aggregator
    assert aggregator.steps == 2 * 2 and aggregator.epochs == [1, 2]


def test_e2e_refuses_a_position_aware_model_when_the_sampled_patches_have_no_coordinates(strict_registered):
    import dataclasses

    slides = [dataclasses.replace(s, low_coords=None) for s in toy_slides(4, n_patches=16, size=16, seed=0)]
    config = E2EConfig(encoder_kwargs={"widths": (4, 8, 8, 16)}, aggregator=STRICT, s=8, ratio=4, epochs=1,
                       batch_slides=2, device="cpu")
    Strict.needs_coords = True
    try:
        with pytest.raises(ValueError, match=r"toy_000.*position-aware.*low_coords"):
            train_e2e({"train": slides}, ClassificationTask(2), config)
    finally:
        del Strict.needs_coords
