"""End-to-end trainer: learning on a toy cohort, chunked = unchunked evaluation, unreadable slides, augmentation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from milstudy.data.e2e_slides import E2ESlide
from milstudy.train.e2e import (
    E2EConfig,
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
    assert "val_auc" in result.history and 1 <= result.best_epoch <= 4
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
                from milstudy.data.e2e_slides import UnreadableSlideError

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
    from milstudy.papers import grids
    from milstudy.train import e2e

    calls = []
    real = e2e.train_e2e
    monkeypatch.setattr(e2e, "train_e2e", lambda *a, **k: calls.append(a[2].seed) or real(*a, **k))
    slides = make_toy_slides(6)
    data = {"train": slides[:4], "val": slides[4:]}
    base = _config(epochs=1)
    configs = {"a": base, "b": replace(base), "c": replace(base, s=8)}
    frame = grids.run_grid(configs, data, ClassificationTask(2), seeds=[0, 1], progress=False)
    assert sorted(calls) == [0, 0, 1, 1]  # "b" is "a": trained once per seed
    assert list(frame["run"]) == ["a", "a", "b", "b", "c", "c"]
    a, b = frame[frame.run == "a"].drop(columns=["run", "same_as"]), frame[frame.run == "b"].drop(columns=["run", "same_as"])
    assert a.reset_index(drop=True).equals(b.reset_index(drop=True))
    assert set(frame.loc[frame.run == "b", "same_as"]) == {"a"}


def test_run_grid_cache_and_worker_processes_give_the_serial_numbers(monkeypatch):
    """A RunCache serves a later grid's identical (config, seed) runs; workers=2 (spawned, one thread each) gives
    the numbers of the serial grid; callbacks refuse workers."""
    from milstudy.papers import grids

    slides = make_toy_slides(6)
    data = {"train": slides[:4], "val": slides[4:5], "test": slides[5:]}
    base = _config(epochs=1, aggregator="abmil")  # a registered model: spawned workers do not see test registrations
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial, serial_pred = grids.run_grid({"a": base, "c": replace(base, s=8)}, data, ClassificationTask(2),
                                             seeds=[0, 1], progress=False, return_predictions=True)
        cache = grids.RunCache()
        first = grids.run_grid({"a": base}, data, ClassificationTask(2), seeds=[0, 1], progress=False, cache=cache)
        parallel, parallel_pred = grids.run_grid({"again": base, "c": replace(base, s=8)}, data,
                                                 ClassificationTask(2), seeds=[0, 1], progress=False,
                                                 return_predictions=True, workers=2, cache=cache)
    finally:
        torch.set_num_threads(threads)
    timing = ["wall_time_s", "train_time_s", "run", "same_as"]
    assert first.drop(columns=timing, errors="ignore").equals(
        serial[serial.run == "a"].drop(columns=timing, errors="ignore").reset_index(drop=True))
    assert list(parallel["same_as"]) == ["a", "a", "", ""]  # served from the first grid's runs
    numbers = lambda frame: frame.drop(columns=timing, errors="ignore").reset_index(drop=True)
    assert numbers(parallel).equals(numbers(serial))
    columns = [c for c in serial_pred.columns if c != "method"]
    assert parallel_pred[columns].equals(serial_pred[columns])
    with pytest.raises(ValueError, match="callbacks"):
        grids.run_grid({"a": base}, data, ClassificationTask(2), seeds=[0], callbacks=[print], workers=2)


def test_profile_aggregator_sizes():
    from milstudy.papers.abmilx import aggregator_kwargs

    assert aggregator_kwargs("transmil", "cpu") == {"dim": 64, "heads": 4}
    assert aggregator_kwargs("transmil", "paper") == {"dim": 256, "heads": 8}
    assert aggregator_kwargs("rrtmil", "cpu") == {"dim": 64, "heads": 4}  # matched width, as TransMIL
    # matched capacity: ABMIL (upstream layout) and mean pooling get ABMILX's width; DSMIL has no width argument
    assert aggregator_kwargs("abmil_upstream", "smoke") == {"hidden_dim": 64}
    assert aggregator_kwargs("mean_pooling", "cpu", width=32) == {"hidden_dim": 32}
    assert aggregator_kwargs("dsmil", "cpu") == {}
    with pytest.raises(ValueError, match="profile"):
        aggregator_kwargs("abmilx", "laptop")


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
        if state.epoch == 2:
            raise _Interrupt

    run_dir = str(tmp_path / "interrupted")
    with pytest.raises(_Interrupt):
        train_e2e(splits, ClassificationTask(2), replace(config, checkpoint_dir=run_dir), [crash_after_epoch_1])
    assert sorted(p.name for p in (tmp_path / "interrupted").glob("epoch_*")) == ["epoch_0001"]
    resumed = train_e2e(splits, ClassificationTask(2), replace(config, checkpoint_dir=run_dir), keep_model=True)

    drop = ["train_time", "time"]
    assert resumed.history.drop(columns=drop).equals(full.history.drop(columns=drop))
    assert resumed.best_epoch == full.best_epoch and resumed.test_metrics == full.test_metrics
    assert resumed.test_metrics_ema == full.test_metrics_ema
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    assert sorted(resumed.attention_snapshots) == [0, 1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    slides = make_toy_slides(6)
    splits = {"train": slides[:4], "val": slides[4:]}
    train_e2e(splits, ClassificationTask(2), _config(epochs=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"another config \(s: 12 -> 8\)"):
        train_e2e(splits, ClassificationTask(2), _config(epochs=1, s=8, checkpoint_dir=str(tmp_path)))
    fresh = train_e2e(splits, ClassificationTask(2), _config(epochs=1, s=8, checkpoint_dir=str(tmp_path),
                                                             resume=False))
    assert len(fresh.history) == 1


def test_case_bags_read_across_their_slides_and_train():
    from milstudy.data.e2e_slides import E2ECase, cases_from_slides

    slides = make_toy_slides(8)
    case_of = {s.slide_id: f"case_{i // 2 if i < 4 else i}" for i, s in enumerate(slides)}
    for i in (1, 3):  # cases of two slides need one target
        slides[i - 1].target = slides[i].target
    cases = cases_from_slides(slides, case_of)
    assert [c.slide_id for c in cases] == ["case_0", "case_1", "case_4", "case_5", "case_6", "case_7"]
    pair = cases[0]
    assert isinstance(pair, E2ECase) and pair.n_main == slides[0].n_main + slides[1].n_main
    assert pair.n_low == slides[0].n_low + slides[1].n_low
    union = np.concatenate([slides[0].main, slides[1].main])
    picks = np.array([30, 2, 25, 24, 0, 47])
    np.testing.assert_array_equal(pair.read("main", picks), union[picks])
    np.testing.assert_array_equal(pair.instance_labels,
                                  np.concatenate([slides[0].instance_labels, slides[1].instance_labels]))
    assert pair.read("low", np.array([], np.int64)).shape[0] == 0
    assert not isinstance(cases[2], E2ECase) and cases[2].main is slides[4].main  # one slide: renamed, same data
    result = train_e2e({"train": cases[:4], "val": cases[4:]}, ClassificationTask(2), _config(epochs=1))
    assert set(result.predictions["slide_id"]) == {"case_6", "case_7"} and result.n_skipped == 0
    evaluation = evaluate_slides(build_e2e_model(_config(), 2).eval(), cases[:1], ClassificationTask(2), _config(),
                                 torch.device("cpu"))
    assert evaluation.attention["case_0"].shape[-1] == pair.n_main  # evaluation sees every patch of the case


def test_case_with_disagreeing_targets_is_refused():
    from milstudy.data.e2e_slides import cases_from_slides

    slides = make_toy_slides(2)  # labels 0 and 1
    with pytest.raises(ValueError, match="case 'c'.*different targets"):
        cases_from_slides(slides, {s.slide_id: "c" for s in slides})


def test_load_data_by_case_merges_slides_of_a_case(tmp_path):
    from milstudy.data.synthetic import cohort_for_profile
    from milstudy.data.e2e_slides import E2ECase, load_data

    frame = cohort_for_profile("smoke", task="detection").manifest.copy()
    frame.loc[1, ["case_id", "label", "split"]] = frame.loc[0, ["case_id", "label", "split"]].to_numpy()
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    spec = {"manifest": str(manifest), "main_mpp": 4.0, "patch_size": 32, "by_case": True}
    splits, _ = load_data(spec, load_banks=False)
    bags = {b.slide_id: b for bags in splits.values() for b in bags}
    assert len(bags) == len(frame) - 1
    merged = bags[str(frame.loc[0, "case_id"])]
    assert isinstance(merged, E2ECase) and [p.slide_id for p in merged.parts] == list(frame["slide_id"][:2])
    assert merged in splits[str(frame.loc[0, "split"])]
    frame.loc[1, "split"] = "test" if frame.loc[0, "split"] != "test" else "train"
    frame.to_csv(manifest, index=False)
    with pytest.raises(ValueError, match="more than one partition"):  # the manifest check names the lines
        load_data(spec, load_banks=False)


def test_upstream_survival_fold_keeps_its_test_cases_and_carves_validation_from_train():
    from milstudy.data.manifests import load_manifest
    from milstudy.paths import REPO_ROOT
    from milstudy.data.e2e_slides import _assign_splits

    manifest = load_manifest(REPO_ROOT / "data_manifests" / "tcga_brca_survival.csv")
    for fold in range(3):
        out = _assign_splits(manifest, {"fold": fold}, seed=0)
        upstream = manifest[f"fold_{fold}"].astype(str)
        assert (out["split"][upstream == "test"] == "test").all()  # the upstream test fold is untouched
        assert set(out["split"][upstream == "train"]) == {"train", "val"}
        cases = out.groupby("case_id")["split"].nunique()
        assert (cases == 1).all()  # patient-level
        train_cases = manifest.loc[upstream == "train", "case_id"].nunique()
        val_cases = out.loc[out["split"] == "val", "case_id"].nunique()
        assert 0.10 < val_cases / train_cases < 0.15
    with pytest.raises(ValueError, match="no column 'fold_7'"):
        _assign_splits(manifest, {"fold": 7}, seed=0)


def test_available_aggregators_by_label():
    from milstudy.papers.abmilx import available_aggregators

    assert available_aggregators(["ABMIL", "ViTMIL"]) == {"ABMIL": "abmil_upstream", "ViTMIL": "vitmil"}
    assert available_aggregators({"X": "no_such_model", "ABMIL": "abmil"}) == {"ABMIL": "abmil"}
    assert available_aggregators(["TransMIL", "RRTMIL"]) == {"TransMIL": "transmil", "RRTMIL": "rrtmil"}
    with pytest.raises(ValueError, match="unknown aggregator label"):
        available_aggregators(["ABMIL", "WiKG"])


def test_descriptor_tier_trains_end_to_end_without_images():
    """Slides whose "patches" are descriptor vectors go through the same E2E step with an MLP encoder: the
    encoder receives gradient, no image augmentation is applied, and the planted signal is learned."""
    rng = np.random.default_rng(0)
    slides = []
    for i in range(40):
        main = rng.normal(size=(30, 6)).astype(np.float32)
        low = rng.normal(size=(8, 6)).astype(np.float32)
        if i % 2:
            main[rng.choice(30, 6, replace=False), 0] += 3.0
        coords = np.stack([np.arange(30) % 6, np.arange(30) // 6], 1) * 64
        slides.append(E2ESlide(f"d{i}", i % 2, coords, main, low, low_coords=coords[:8] * 2))
    config = _config(encoder="descriptor_mlp", encoder_kwargs={"in_dim": 6, "widths": (16,)}, aggregator="abmil",
                     epochs=12, lr=3e-3, s=16, descriptor_noise=0.05)
    result = train_e2e({"train": slides[:24], "val": slides[24:32], "test": slides[32:]}, ClassificationTask(2),
                       config, keep_model=True)
    assert result.test_metrics["auc"] >= 0.9
    first = result.model.encoder.net[0].weight
    assert not torch.allclose(first, build_e2e_model(config, 2).encoder.net[0].weight)  # the encoder trained
