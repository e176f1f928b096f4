"""Two-stage trainer: learning, validation-only selection, exact resume, determinism, oversampling, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from milstudy.data.bags import Bag, BagListDataset
from milstudy.models.base import MILOutput
from milstudy.train.checkpoint import latest_checkpoint
from milstudy.train.oversampling import oversample_indices
from milstudy.train.tasks import ClassificationTask, SurvivalTask
from milstudy.train.loop import EMA, cosine_schedule
from milstudy.train.two_stage import TrainConfig, seed_everything, train_two_stage

DIM = 4


class ToyAttentionMIL(nn.Module):
    """A small attention-MIL model (test stand-in for the zoo) with dropout, so resume must restore RNG state."""

    def __init__(self, in_dim: int = DIM, n_out: int = 2, dropout: float = 0.1):
        super().__init__()
        self.in_dim = in_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, 16), nn.ReLU(), nn.Dropout(dropout))
        self.score = nn.Linear(16, 1)
        self.head = nn.Linear(16, n_out)

    def forward(self, x, coords=None, mask=None):
        h = self.embed(x)
        a = self.score(h).squeeze(-1)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        w = torch.softmax(a, dim=1)
        return MILOutput(logits=self.head((w.unsqueeze(-1) * h).sum(1)), attention=w.unsqueeze(1))


class CrashingMIL(ToyAttentionMIL):
    """Raises on the ``crash_at``-th training forward call: simulates a job killed mid-run."""

    def __init__(self, crash_at: int, **kw):
        super().__init__(**kw)
        self.crash_at, self.calls = crash_at, 0

    def forward(self, x, coords=None, mask=None):
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at:
                raise RuntimeError("simulated crash")
        return super().forward(x, coords, mask)


def toy_bags(n: int, seed: int, prefix: str) -> list[Bag]:
    """Bag positive iff it holds a key instance (feature 0 shifted by +3)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        size = int(rng.integers(4, 10))
        x = rng.normal(size=(size, DIM)).astype(np.float32)
        label = int(i % 2)
        if label:
            x[rng.integers(size), 0] += 3.0
        bags.append(Bag(features=torch.from_numpy(x), slide_id=f"{prefix}{i}", target=label,
                        coords=torch.zeros(size, 2, dtype=torch.int64)))
    return bags


@pytest.fixture(scope="module")
def splits():
    return (BagListDataset(toy_bags(40, 0, "tr")), BagListDataset(toy_bags(16, 1, "va")),
            BagListDataset(toy_bags(16, 2, "te")))


def run(splits, config: TrainConfig, model_cls=ToyAttentionMIL, test=None, **model_kw):
    seed_everything(config.seed)
    model = model_cls(**model_kw)
    train, val, default_test = splits
    return model, train_two_stage(model, ClassificationTask(2), train, val, test or default_test, config)


FAST = TrainConfig(epochs=6, lr=1e-2, warmup_epochs=1, quiet=True)


def strip_time(history):
    return history.drop(columns=["time", "train_time"]).to_dict("records")


def test_learns_toy_mil_problem(splits):
    _, result = run(splits, FAST)
    assert result.test_metrics["accuracy"] >= 0.9
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    assert set(result.predictions["split"]) == {"val", "test"}
    assert {"slide_id", "target", "prob_0", "prob_1", "prediction"} <= set(result.predictions.columns)
    attention = result.attention["te3"]
    assert attention.shape == (1, len(splits[2][3])) and attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.monitor == "auc" and 1 <= result.best_epoch <= 6


def test_selection_uses_validation_only(splits):
    """Corrupting the test labels must not change training, selection or validation numbers."""
    flipped = BagListDataset([dataclasses.replace(b, target=1 - b.target) for b in splits[2]])
    _, clean = run(splits, FAST)
    _, corrupt = run(splits, FAST, test=flipped)
    assert clean.best_epoch == corrupt.best_epoch
    assert strip_time(clean.history) == strip_time(corrupt.history)
    assert clean.val_metrics == corrupt.val_metrics
    assert corrupt.test_metrics["accuracy"] == pytest.approx(1 - clean.test_metrics["accuracy"])


def test_same_seed_same_metrics(splits):
    config = dataclasses.replace(FAST, epochs=3)
    _, a = run(splits, config)
    _, b = run(splits, config)
    assert strip_time(a.history) == strip_time(b.history) and a.test_metrics == b.test_metrics
    _, c = run(splits, dataclasses.replace(config, seed=1))
    assert strip_time(c.history) != strip_time(a.history)


@pytest.mark.parametrize("instance_share", [None, 0.5])
def test_resume_after_crash_equals_uninterrupted_run(splits, tmp_path, instance_share):
    config = dataclasses.replace(FAST, epochs=4, snapshot_slides=("tr0", "va1"), ema_decay=0.9,
                                 instance_share=instance_share)
    full_model, full = run(splits, dataclasses.replace(config, checkpoint_dir=tmp_path / "full"))

    crash_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(splits, dataclasses.replace(config, checkpoint_dir=crash_dir), CrashingMIL, crash_at=2 * 40 + 5)
    assert latest_checkpoint(crash_dir).name == "epoch_0002"
    # a fresh process: new model object, different global RNG state; everything must come from the checkpoint
    torch.manual_seed(12345)
    resumed_model = ToyAttentionMIL()
    resumed = train_two_stage(resumed_model, ClassificationTask(2), *splits,
                              dataclasses.replace(config, checkpoint_dir=crash_dir))
    assert strip_time(resumed.history) == strip_time(full.history)
    assert resumed.best_epoch == full.best_epoch and resumed.test_metrics == full.test_metrics
    assert resumed.test_metrics_ema == full.test_metrics_ema
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert sorted(resumed.attention_snapshots) == [0, 1, 2, 3, 4]
    for epoch, per_slide in full.attention_snapshots.items():
        for slide_id, attention in per_slide.items():
            np.testing.assert_array_equal(attention, resumed.attention_snapshots[epoch][slide_id])
    assert (crash_dir / "best" / "model.safetensors").is_file()


def test_early_stopping_and_padded_batches(splits):
    config = dataclasses.replace(FAST, epochs=30, patience=2, min_epochs=3, batch_size=4, eval_batch_size=4,
                                 monitor="loss")
    _, result = run(splits, config)
    for bag in splits[2]:  # padded evaluation: attention cropped to each bag's real instances
        attention = result.attention[bag.slide_id]
        assert attention.shape == (1, len(bag)) and attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.stopped_early and len(result.history) < 30
    assert len(result.history) >= 3 and result.best_epoch == len(result.history) - 2
    losses = result.history["val_loss"].tolist()
    assert losses[result.best_epoch - 1] == min(losses)


def test_survival_with_cox_batches_and_errors(splits):
    rng = np.random.default_rng(0)

    def survival(bags):  # key-instance bags die early
        return BagListDataset([dataclasses.replace(
            b, target=torch.tensor([float(rng.uniform(1, 5) + 10 * (1 - b.target)), float(rng.random() < 0.8)]))
            for b in bags])

    train, val = survival(splits[0]), survival(splits[1])
    task = SurvivalTask(loss="cox")
    seed_everything(0)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train_two_stage(ToyAttentionMIL(n_out=1), task, train, val, None, FAST)
    result = train_two_stage(ToyAttentionMIL(n_out=1), task, train, val, None,
                             dataclasses.replace(FAST, batch_size=4, epochs=8))
    assert np.isfinite(result.history["train_loss"]).all()
    assert result.val_metrics["c_index"] > 0.7 and result.monitor == "c_index"
    nll = train_two_stage(ToyAttentionMIL(n_out=4), SurvivalTask(n_bins=4), train, val, None,
                          dataclasses.replace(FAST, epochs=3))
    assert len(nll.task.bin_edges) == 5 and "risk" in nll.predictions


def test_bad_label_fails_before_training(splits):
    bad = BagListDataset([*splits[1].bags[:-1], dataclasses.replace(splits[1][15], target=2)])
    with pytest.raises(ValueError, match=r"slide va15: label 2 is not one of the task's classes \[0, 1\]"):
        train_two_stage(ToyAttentionMIL(), ClassificationTask(2), splits[0], bad, None, FAST)
    with pytest.raises(ValueError, match="feature dimension 4 does not match the model's in_dim 7"):
        train_two_stage(ToyAttentionMIL(in_dim=7), ClassificationTask(2), splits[0], splits[1], None, FAST)


def test_oversampling_reaches_ratio():
    labels = np.array([0] * 40 + [1] * 7 + [2] * 30)
    idx = oversample_indices(labels, ratio=2.0, seed=0)
    counts = np.bincount(labels[idx])
    assert counts.tolist() == [40, 20, 30]
    assert set(range(len(labels))) <= set(idx.tolist())  # every original bag kept
    np.testing.assert_array_equal(idx, oversample_indices(labels, ratio=2.0, seed=0))
    assert np.bincount(labels[oversample_indices(labels, 1.0)]).tolist() == [40, 40, 40]
    with pytest.raises(ValueError, match="ratio"):
        oversample_indices(labels, ratio=0.5)


def test_oversampling_in_trainer_sees_more_minority(splits):
    imbalanced = BagListDataset([b for b in splits[0] if b.target == 0] + [b for b in splits[0] if b.target][:4])
    _, result = run((imbalanced, splits[1], splits[2]), dataclasses.replace(FAST, epochs=1, oversample=2.0))
    assert result.history["train_bags"].iloc[0] == 20 + 10  # 4 positives topped up to 20 / 2


def test_cosine_schedule_and_ema():
    assert cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert cosine_schedule(9, 100, 10) == pytest.approx(1.0)
    assert cosine_schedule(10, 100, 10) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 10) == pytest.approx(0.5)
    assert cosine_schedule(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, before + 1.0)


def test_non_finite_bag_stops_before_the_first_epoch(splits):
    """A NaN bag in any split is an error naming the slide before training starts, not after every epoch ran."""
    bad = list(splits[2])
    features = bad[3].features.clone()
    features[1, 0] = float("nan")
    bad[3] = dataclasses.replace(bad[3], features=features)
    model = ToyAttentionMIL()
    with pytest.raises(Exception, match="te3.*NaN"):
        train_two_stage(model, ClassificationTask(2), splits[0], splits[1], BagListDataset(bad), FAST)


def test_length_grouped_batches_cover_every_bag_once_and_pad_less():
    from milstudy.train.two_stage import length_grouped_batches

    rng = np.random.default_rng(0)
    lengths = rng.lognormal(4.0, 1.2, size=203).astype(np.int64) + 1  # MUSK2-like heavy tail
    order = rng.permutation(len(lengths))
    batches = length_grouped_batches(order, lengths, 8, torch.Generator().manual_seed(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 8 for b in batches)
    for start in range(0, len(order), 64):  # inside each pool of 8 batches, bags come sorted by length
        pool = set(order[start:start + 64].tolist())
        members = [b for b in batches if set(b.tolist()) <= pool]
        assert sum(map(len, members)) == len(pool)
        assert all(np.all(np.diff(lengths[b]) >= 0) for b in members)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_padded = sum(len(b) * lengths[b].max() for b in np.array_split(order, len(batches)))
    assert padded < 0.7 * random_padded
    again = length_grouped_batches(order, lengths, 8, torch.Generator().manual_seed(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches(order, lengths, 0, torch.Generator())


def test_group_by_length_evaluates_in_dataset_order_with_the_same_scores(splits):
    from milstudy.train.two_stage import evaluate

    seed_everything(0)
    model = ToyAttentionMIL()
    task = ClassificationTask(2).prepare([b.target for b in splits[0]])
    plain = evaluate(model, task, splits[2], "test", "cpu", batch_size=1)
    grouped = evaluate(model, task, splits[2], "test", "cpu", batch_size=5, group_by_length=True)
    assert grouped.predictions["slide_id"].tolist() == plain.predictions["slide_id"].tolist()
    np.testing.assert_allclose(grouped.predictions["prob_1"], plain.predictions["prob_1"], atol=1e-6)
    assert grouped.loss == pytest.approx(plain.loss, abs=1e-6)
    assert list(grouped.attention) == list(plain.attention)
    for slide_id, attention in plain.attention.items():
        np.testing.assert_allclose(grouped.attention[slide_id], attention, atol=1e-6)


def test_group_by_length_training_learns_and_batches_similar_bags(splits):
    config = dataclasses.replace(FAST, epochs=15, batch_size=4, eval_batch_size=4, group_by_length=True)
    seen = []

    class Recording(ToyAttentionMIL):
        def forward(self, x, coords=None, mask=None):
            if self.training:
                seen.append(mask.sum(1).tolist())
            return super().forward(x, coords, mask)

    _, result = run(splits, config, Recording)
    assert result.test_metrics["accuracy"] >= 0.9
    per_epoch = len(seen) // config.epochs
    assert sorted(n for batch in seen[:per_epoch] for n in batch) == sorted(len(b) for b in splits[0])
    spread = np.mean([max(b) - min(b) for b in seen])
    assert spread <= 1.5  # toy bags have 4-9 instances: random batches of 4 spread 3.1 (measured), grouped 0.8


# ---------------------------------------------------------------------------------- instance_share (subsampling)
def test_subsample_instances_is_keyed_by_seed_epoch_and_slide_and_keeps_rows_together():
    from milstudy.train.two_stage import subsample_instances

    n = 50
    bag = Bag(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3), "s1", 1,
              torch.stack([torch.arange(n), 2 * torch.arange(n)], 1), torch.arange(n) % 2)
    other = dataclasses.replace(bag, slide_id="s2")
    [a, b] = subsample_instances([bag, other], 0.3, seed=0, epoch=1)
    assert len(a) == 15 and len(b) == 15
    kept = a.features[:, 0].long()
    assert torch.all(kept[1:] > kept[:-1])  # distinct, in their original order
    assert torch.equal(a.coords, torch.stack([kept, 2 * kept], 1)) and torch.equal(a.instance_labels, kept % 2)
    assert (a.slide_id, a.target) == ("s1", 1)
    assert not torch.equal(a.features, b.features)  # another slide, another draw
    # the draw depends on (seed, epoch, slide id) only: not on the batch it comes in or its position there
    [alone] = subsample_instances([bag], 0.3, seed=0, epoch=1)
    [second] = subsample_instances([other, bag], 0.3, seed=0, epoch=1)[1:]
    assert torch.equal(alone.features, a.features) and torch.equal(second.features, a.features)
    for seed, epoch in [(0, 2), (1, 1)]:
        [moved] = subsample_instances([bag], 0.3, seed=seed, epoch=epoch)
        assert not torch.equal(moved.features, a.features)
    tiny = Bag(torch.ones(1, 3), "t", 0)
    assert len(subsample_instances([tiny], 0.1, 0, 1)[0]) == 1  # at least one instance, never an empty bag


def test_instance_share_trains_on_subsampled_bags_and_evaluates_whole_ones(splits):
    config = dataclasses.replace(FAST, epochs=12, instance_share=0.5, snapshot_slides=("te0",))
    seen = {"train": [], "eval": []}

    class Recording(ToyAttentionMIL):
        def forward(self, x, coords=None, mask=None):
            seen["train" if self.training else "eval"].append(x.shape[1])
            return super().forward(x, coords, mask)

    _, result = run(splits, config, Recording)
    per_epoch = len(splits[0])
    first = sorted(seen["train"][:per_epoch])
    assert first == sorted(max(1, round(0.5 * len(b))) for b in splits[0])
    assert set(seen["eval"]) <= {len(b) for ds in splits[1:] for b in ds}  # validation / test: whole bags
    assert result.attention_snapshots[3]["te0"].shape == (1, len(splits[2][0]))
    assert result.test_metrics["accuracy"] >= 0.8  # the key instance survives half the time: still learnable
    _, again = run(splits, config)
    assert strip_time(again.history) == strip_time(result.history)
    _, whole = run(splits, dataclasses.replace(config, instance_share=None))
    assert strip_time(whole.history) != strip_time(result.history)


@pytest.mark.parametrize("share", [0.0, 1.0, 1.5, -0.2])
def test_instance_share_outside_the_open_unit_interval_is_refused(share):
    with pytest.raises(ValueError, match="instance_share must be None"):
        TrainConfig(instance_share=share)
