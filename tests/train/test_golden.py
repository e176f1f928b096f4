"""The one loop reproduces the pre-refactor trainers: metrics of small fixed-seed ABMIL / ABMILX runs (two-stage and
end-to-end, classification and survival) recorded at commit a9c457a (tests/fixtures/make_golden.py, with the data
and configurations defined there) must come out of ``fit`` to ``TOL`` (1e-4): the record was made on an x86 CPU
whose float32 kernels round differently from another CPU's (an AMD EPYC without AVX-512 gives the same epochs and
metrics with losses 2e-6 to 4e-5 away), so the bar is set above that and far below what a changed trainer gives.

Fixes of the platform issue that change these values say so here and in their commit; none of them applies to
these configurations (no early stopping, no DSMIL, no regional sampling, no padding beyond a scale's quota).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_golden as G  # noqa: E402

from milstudy.models import build_model  # noqa: E402
from milstudy.train.e2e import E2EConfig, train_e2e  # noqa: E402
from milstudy.train.two_stage import TrainConfig, seed_everything, train_two_stage  # noqa: E402

GOLDEN = json.loads((FIXTURES / "golden_metrics.json").read_text())["runs"]


@pytest.fixture(autouse=True)
def one_thread():
    """The record was made with 1 torch thread; float reductions (and so the match to TOL) depend on it, whatever an
    earlier test in this worker left set."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _summary(result) -> dict:
    return {"train_loss": list(result.history["train_loss"]), "val_loss": list(result.history["val_loss"]),
            "best_epoch": int(result.best_epoch), "test": G._clean(result.test_metrics),
            "test_last": G._clean(result.test_metrics_last)}


TOL = 1e-4  # see the module docstring: float32 rounding differs between CPU instruction sets


def _assert_same(ours: dict, golden: dict) -> None:
    assert ours["best_epoch"] == golden["best_epoch"]
    for key in ("train_loss", "val_loss"):
        assert ours[key] == pytest.approx(golden[key], abs=TOL, rel=0), key
    for key in ("test", "test_last"):
        assert sorted(ours[key]) == sorted(golden[key])
        assert ours[key] == pytest.approx(golden[key], abs=TOL, rel=0), key


@pytest.mark.parametrize("name", sorted(G.TWO_STAGE_CASES))
def test_two_stage_matches_pre_refactor_trainer(name):
    model_name, kwargs, survival = G.TWO_STAGE_CASES[name]
    task = G.task_for(survival)
    seed_everything(G.TWO_STAGE_CONFIG["seed"])
    model = build_model(model_name, G.DIM, task.n_out, **kwargs)
    train, val, test = G.two_stage_splits(survival)
    result = train_two_stage(model, task, train, val, test, TrainConfig(device="cpu", **G.TWO_STAGE_CONFIG))
    _assert_same(_summary(result), GOLDEN[name])


@pytest.mark.parametrize("name", sorted(G.E2E_CASES))
def test_e2e_matches_pre_refactor_trainer(name):
    model_name, kwargs, survival = G.E2E_CASES[name]
    config = E2EConfig(aggregator=model_name, aggregator_kwargs=kwargs, **G.E2E_CONFIG)
    result = train_e2e(G.e2e_data(survival), G.task_for(survival), config)
    _assert_same(_summary(result), GOLDEN[name])
