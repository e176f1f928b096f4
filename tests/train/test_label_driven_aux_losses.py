"""Models with label-driven auxiliary losses (CLAM-SB's instance loss) in the two-stage trainer: they get class
labels on classification tasks and train on the task loss alone on survival tasks (no classes to cluster)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from milstudy.data.bags import Bag, BagListDataset
from milstudy.models import build_model
from milstudy.train import two_stage as trainer_module
from milstudy.train.tasks import ClassificationTask, SurvivalTask
from milstudy.train.two_stage import TrainConfig, seed_everything, train_two_stage


def _bags(n: int, seed: int, survival: bool) -> BagListDataset:
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        x = rng.normal(size=(int(rng.integers(10, 16)), 8)).astype(np.float32)
        label = i % 2
        x[0, 0] += 3.0 * label
        target = torch.tensor([float(rng.uniform(1, 5) + 10 * (1 - label)), 1.0]) if survival else label
        bags.append(Bag(features=torch.from_numpy(x), slide_id=f"s{seed}-{i}", target=target))
    return BagListDataset(bags)


def _spy_on_targets(monkeypatch) -> list:
    seen: list = []
    forward = trainer_module._forward

    def spy(model, batch, targets):
        output = forward(model, batch, targets)
        seen.append(set(output.aux_losses))
        return output

    monkeypatch.setattr(trainer_module, "_forward", spy)
    return seen


CONFIG = TrainConfig(epochs=2, lr=1e-3, warmup_epochs=0, batch_size=4, quiet=True)


def test_clam_gets_class_labels_on_classification(monkeypatch):
    seen = _spy_on_targets(monkeypatch)
    seed_everything(0)
    model = build_model("clam_sb", 8, 2, hidden_dim=16, attention_dim=8)
    train_two_stage(model, ClassificationTask(2), _bags(8, 0, False), _bags(4, 1, False), None, CONFIG)
    assert any("instance" in keys for keys in seen)


def test_clam_trains_on_survival_without_the_instance_loss(monkeypatch):
    seen = _spy_on_targets(monkeypatch)
    seed_everything(0)
    model = build_model("clam_sb", 8, 4, hidden_dim=16, attention_dim=8)
    result = train_two_stage(model, SurvivalTask(n_bins=4), _bags(8, 0, True), _bags(4, 1, True), None,
                             dataclasses.replace(CONFIG, batch_size=4))
    assert np.isfinite(result.history["train_loss"]).all()
    assert seen and not any("instance" in keys for keys in seen)
