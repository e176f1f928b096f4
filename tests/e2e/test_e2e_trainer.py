"""End-to-end trainer: learning on a toy cohort, chunked = unchunked evaluation, unreadable slides, augmentation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from milstudy.train.e2e import (
    E2EConfig,
    E2ESlide,
    build_e2e_model,
    encode_chunked,
    evaluate_slides,
    random_resized_crop_flip,
    train_e2e,
)
from milstudy.train.tasks import ClassificationTask

from e2e_toy import TOY_MODEL, make_toy_slides


def _config(**kw) -> E2EConfig:
    base = dict(encoder="tiny_cnn", encoder_kwargs={"widths": (8, 16, 32, 64)}, aggregator=TOY_MODEL, s=12,
                ratio=4, epochs=3, lr=3e-3, warmup_epochs=0, batch_slides=2, device="cpu", eval_chunk=7)
    base.update(kw)
    return E2EConfig(**base)


def test_training_lowers_the_loss_and_selects_on_validation():
    slides = make_toy_slides(12)
    result = train_e2e({"train": slides[:8], "val": slides[8:10], "test": slides[10:]},
                       ClassificationTask(2), _config(epochs=4))
    losses = result.history["train_loss"].to_numpy()
    assert losses[-1] < losses[0], losses
    assert "val_auc" in result.history and 0 <= result.best_epoch < 4
    assert set(result.predictions["split"]) == {"val", "test"} and result.test_metrics is not None
    assert result.n_skipped == 0 and result.wall_time > 0
    heads_n = result.attention["toy_011"].shape
    assert heads_n == (1, 24)  # evaluation uses every main-scale patch


def test_chunked_evaluation_equals_unchunked():
    slides = make_toy_slides(4)
    config = _config()
    model = build_e2e_model(config, 2).eval()
    one = evaluate_slides(model, slides, ClassificationTask(2), E2EConfig(**{**config.to_dict(), "eval_chunk": 1000}),
                          torch.device("cpu"), return_features=True)
    many = evaluate_slides(model, slides, ClassificationTask(2), E2EConfig(**{**config.to_dict(), "eval_chunk": 5}),
                           torch.device("cpu"), return_features=True)
    for sid in one.features:
        torch.testing.assert_close(torch.from_numpy(one.features[sid]), torch.from_numpy(many.features[sid]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(one.attention[sid], many.attention[sid], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one.predictions["prob_1"], many.predictions["prob_1"], rtol=1e-5, atol=1e-7)


def test_unreadable_slide_mid_training_is_skipped_and_counted():
    slides = make_toy_slides(6)

    class FlakySlide(E2ESlide):
        calls = 0

        def read(self, scale, indices):
            FlakySlide.calls += 1
            if FlakySlide.calls > 2:  # readable at first, unreadable from the second epoch on
                from milstudy.train.e2e import UnreadableSlideError

                raise UnreadableSlideError(f"slide {self.slide_id}: file vanished")
            return super().read(scale, indices)

    broken = FlakySlide(**{k: getattr(slides[0], k) for k in ("slide_id", "target", "coords", "main", "low")})
    result = train_e2e({"train": [broken, *slides[1:4]], "val": slides[4:]}, ClassificationTask(2),
                       _config(epochs=3, batch_slides=2))
    assert result.n_skipped >= 1 and "toy_000" in result.skipped_slides
    assert len(result.history) == 3 and np.isfinite(result.history["train_loss"]).all()


def test_all_samplers_train_one_epoch():
    slides = make_toy_slides(6)
    for sampler in ("random", "regional", "attention"):
        result = train_e2e({"train": slides[:4], "val": slides[4:]}, ClassificationTask(2),
                           _config(sampler=sampler, epochs=1, regions=2))
        assert np.isfinite(result.history["train_loss"]).all(), sampler


def test_augmentation_identity_and_shapes():
    images = torch.rand(5, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    same = random_resized_crop_flip(images, 16, 1.0, False, False, gen)
    torch.testing.assert_close(same, images)
    cropped = random_resized_crop_flip(images, 12, 0.25, True, True, gen)
    assert cropped.shape == (5, 3, 12, 12) and cropped.min() >= 0 and cropped.max() <= 1


def test_encode_chunked_matches_batch():
    model = build_e2e_model(_config(), 2).eval()
    patches = np.random.default_rng(0).integers(0, 255, size=(9, 16, 16, 3), dtype=np.uint8)
    full = encode_chunked(model.encoder, patches, 100, torch.device("cpu"))
    torch.testing.assert_close(encode_chunked(model.encoder, patches, 2, torch.device("cpu")), full,
                               rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sampler"):
        E2EConfig(sampler="magic")
    with pytest.raises(ValueError, match="unknown E2EConfig field"):
        E2EConfig.from_dict({"s": 8, "batch": 3})
    assert E2EConfig.from_dict({"ratio": "inf"}).ratio == float("inf")


def test_run_grid_trains_identical_configs_once(monkeypatch):
    from milstudy.train import e2e

    calls = []
    real = e2e.train_e2e
    monkeypatch.setattr(e2e, "train_e2e", lambda *a, **k: calls.append(a[2].seed) or real(*a, **k))
    slides = make_toy_slides(6)
    data = {"train": slides[:4], "val": slides[4:]}
    base = _config(epochs=1)
    configs = {"a": base, "b": replace(base), "c": replace(base, s=8)}
    frame = e2e.run_grid(configs, data, ClassificationTask(2), seeds=[0, 1], progress=False)
    assert sorted(calls) == [0, 0, 1, 1]  # "b" is "a": trained once per seed
    assert list(frame["run"]) == ["a", "a", "b", "b", "c", "c"]
    a, b = frame[frame.run == "a"].drop(columns=["run", "same_as"]), frame[frame.run == "b"].drop(columns=["run", "same_as"])
    assert a.reset_index(drop=True).equals(b.reset_index(drop=True))
    assert set(frame.loc[frame.run == "b", "same_as"]) == {"a"}


def test_profile_aggregator_sizes():
    from milstudy.train.e2e import aggregator_kwargs

    assert aggregator_kwargs("transmil", "cpu") == {"dim": 64, "heads": 4}
    assert aggregator_kwargs("transmil", "paper") == {}
    assert aggregator_kwargs("abmil", "smoke") == {}


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    slides = make_toy_slides(10)
    splits = {"train": slides[:6], "val": slides[6:8], "test": slides[8:]}
    # ABMILX has dropout, and EMA is on: the resumed run must restore the RNG and the EMA weights too
    config = _config(epochs=4, ema_decay=0.9, snapshot_slides=("toy_000",), aggregator="abmilx",
                     aggregator_kwargs={"dim": 16, "heads": 2, "dropout": 0.25})
    full = train_e2e(splits, ClassificationTask(2), replace(config, checkpoint_dir=str(tmp_path / "full")),
                     keep_model=True)

    def crash_after_epoch_1(state):
        if state.epoch == 1:
            raise _Interrupt

    run_dir = str(tmp_path / "interrupted")
    with pytest.raises(_Interrupt):
        train_e2e(splits, ClassificationTask(2), replace(config, checkpoint_dir=run_dir), [crash_after_epoch_1])
    assert sorted(p.name for p in (tmp_path / "interrupted").glob("epoch_*")) == ["epoch_0000"]
    resumed = train_e2e(splits, ClassificationTask(2), replace(config, checkpoint_dir=run_dir), keep_model=True)

    drop = ["epoch_time"]
    assert resumed.history.drop(columns=drop).equals(full.history.drop(columns=drop))
    assert resumed.best_epoch == full.best_epoch and resumed.test_metrics == full.test_metrics
    assert resumed.test_metrics_ema == full.test_metrics_ema
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    assert sorted(resumed.attention_snapshots) == [0, 1, 2, 3]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    slides = make_toy_slides(6)
    splits = {"train": slides[:4], "val": slides[4:]}
    train_e2e(splits, ClassificationTask(2), _config(epochs=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"another config \(s: 12 -> 8\)"):
        train_e2e(splits, ClassificationTask(2), _config(epochs=1, s=8, checkpoint_dir=str(tmp_path)))
    fresh = train_e2e(splits, ClassificationTask(2), _config(epochs=1, s=8, checkpoint_dir=str(tmp_path),
                                                             resume=False))
    assert len(fresh.history) == 1
