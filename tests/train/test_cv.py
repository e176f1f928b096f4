"""Cross-validation splits and aggregation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from milstudy.train.cv import aggregate_runs, cross_validate, kfold_splits
from milstudy.train.tasks import ClassificationTask
from milstudy.train.two_stage import TrainConfig

from .test_trainer import ToyAttentionMIL, toy_bags


def test_kfold_splits_are_disjoint_stratified_and_patient_level():
    labels = np.array([0, 1] * 30)
    groups = np.repeat(np.arange(30), 2)  # two slides per patient, one of each class
    splits = kfold_splits(labels, groups, k=5, seed=0, val_fraction=0.2)
    tests = np.concatenate([test for _, _, test in splits])
    assert sorted(tests.tolist()) == list(range(60))  # every slide tested exactly once
    for train, val, test in splits:
        assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
        assert len(train) + len(val) + len(test) == 60
        assert not set(groups[test]) & set(groups[np.concatenate([train, val])])  # patients stay together
        assert len(val) > 0
    with pytest.raises(ValueError, match="k >= 2"):
        kfold_splits(labels, groups, k=1, seed=0, val_fraction=0.2)


def test_cross_validate_pools_out_of_fold_predictions():
    bags = toy_bags(24, 0, "b")
    config = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=0, quiet=True)
    result = cross_validate(lambda: ToyAttentionMIL(), ClassificationTask(2), bags, k=3, seeds=(0, 1),
                            config=config, n_bootstrap=50, bootstrap_metrics=["auc"])
    assert len(result.runs) == 6 and set(result.runs["seed"]) == {0, 1}
    for seed in (0, 1):  # each slide once per seed in the pooled out-of-fold predictions
        assert sorted(result.predictions.query("seed == @seed")["slide_id"]) == sorted(b.slide_id for b in bags)
    summary = result.summary.set_index("metric")
    assert set(summary.index) == {"accuracy", "balanced_accuracy", "f1_macro", "auc"}
    acc = result.runs["test_accuracy"]
    assert summary.loc["accuracy", "mean"] == pytest.approx(acc.mean())
    assert summary.loc["auc", "ci_lo"] <= summary.loc["auc", "boot_mean"] <= summary.loc["auc", "ci_hi"]
    table = aggregate_runs({"toy": result}, metrics=["accuracy", "auc"])
    assert list(table.columns) == ["model", "accuracy", "accuracy pooled [95% CI]", "auc", "auc pooled [95% CI]"]
    assert " ± " in table.loc[0, "accuracy"]


def test_bootstrap_fast_path_equals_frame_metric_path():
    """Accuracy / binary AUC take a numpy path in the bootstrap; it must give the CIs of task.frame_metric exactly
    (two seeds averaged, tied probabilities, resamples with a single class skipped)."""
    import pandas as pd

    from milstudy.train.cv import summarize_cv
    from milstudy.train.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    n, task = 9, ClassificationTask(2)
    frames = []
    for seed in (0, 1):
        p = np.round(rng.random(n), 1)  # ties
        frames.append(pd.DataFrame({"seed": seed, "fold": 0, "slide_id": [f"s{i}" for i in range(n)],
                                    "target": [0, 0, 0, 0, 0, 0, 0, 1, 1], "prob_0": 1 - p, "prob_1": p}))
    predictions = pd.concat(frames, ignore_index=True)
    runs = pd.DataFrame({"test_accuracy": [0.5, 0.7], "test_auc": [0.6, 0.8]})
    summary = summarize_cv(runs, predictions, task, ["accuracy", "auc"], n_bootstrap=300).set_index("metric")
    index = np.arange(n)
    for name in ("accuracy", "auc"):
        reference = bootstrap_ci(
            lambda rows, _: np.mean([task.frame_metric(f.reset_index(drop=True).iloc[rows], name) for f in frames]),
            index, index, n=300, seed=0)
        assert np.isclose(summary.loc[name, "ci_lo"], reference.lo, atol=1e-12)
        assert np.isclose(summary.loc[name, "ci_hi"], reference.hi, atol=1e-12)
        assert np.isclose(summary.loc[name, "boot_mean"], reference.mean, atol=1e-12)
        assert np.isclose(summary.loc[name, "boot_std"], reference.std, atol=1e-12)
    assert reference.n_skipped > 0  # the AUC case exercised undefined resamples


def test_model_grid_in_worker_processes_equals_the_serial_grid():
    """workers=2 runs each model in a spawned process (one thread); the numbers must not change."""
    import torch

    from milstudy.parallel import process_map
    from milstudy.train.cv import run_model_grid

    bags = toy_bags(20, 3, "g")
    config = TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0, quiet=True, batch_size=4, group_by_length=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kwargs = dict(k=2, seeds=(0,), config=config, n_bootstrap=20, bootstrap_metrics=["auc"], progress=False)
        serial = run_model_grid(["mean_pooling", "abmil"], ClassificationTask(2), bags, **kwargs)
        parallel = run_model_grid(["mean_pooling", "abmil"], ClassificationTask(2), bags, workers=2, **kwargs)
    finally:
        torch.set_num_threads(threads)
    strip = lambda grid: grid.runs[~grid.runs["metric"].str.contains("wall_time")].reset_index(drop=True)
    assert len(strip(serial)) > 0 and strip(serial).equals(strip(parallel))
    assert serial.summary.drop(columns=[c for c in serial.summary if "wall" in c]).equals(
        parallel.summary.drop(columns=[c for c in parallel.summary if "wall" in c]))
    with pytest.raises(ValueError, match="workers"):
        process_map(len, [[1]], workers=0)


def test_fold_units_pair_the_same_fold_of_the_same_repeat():
    from milstudy.train.cv import ModelGrid

    runs = pd.DataFrame({"model": ["a", "a", "b", "b", "a"], "seed": [0, 1, 0, 1, 0], "fold": [2, 2, 2, 2, 3],
                         "metric": ["test_accuracy"] * 4 + ["val_accuracy"], "value": [0.5, 0.6, 0.7, 0.8, 0.9]})
    units = ModelGrid({}, runs, pd.DataFrame()).fold_units("accuracy", prefix="musk1: ")
    assert units.to_dict("list") == {"method": ["musk1: a", "musk1: a", "musk1: b", "musk1: b"],
                                     "seed": [2, 1002, 2, 1002], "accuracy": [0.5, 0.6, 0.7, 0.8]}
    with pytest.raises(ValueError, match="no test_auc.*accuracy"):
        ModelGrid({}, runs, pd.DataFrame()).fold_units("auc")
