"""``milstudy train`` / ``milstudy eval`` on tiny synthetic feature bags written in our HDF5 layout."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.cli import main
from milstudy.train.two_stage_inputs import resolve_device_name

N_SLIDES, DIM = 36, 8
FAST = ["--model", "abmil", "--epochs", "10", "--lr", "1e-3", "--set", "warmup_epochs=0", "--quiet"]


def _write_bag(path, features):
    coords = np.stack([np.arange(len(features)) * 256, np.zeros(len(features))], 1).astype(np.int64)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        handle.create_dataset("coords", data=coords)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """36 slides (18 positive: 4 of their instances shifted by +2 in features 0-3), 2 slides per case, a split column."""
    root = tmp_path_factory.mktemp("cohort")
    features = root / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_SLIDES):
        label = i % 2
        bag = rng.normal(size=(int(rng.integers(6, 14)), DIM))
        if label:
            bag[:4, :4] += 2.0
        sid = f"s{i:02d}"
        _write_bag(features / f"{sid}.h5", bag)
        case = i // 4 * 2 + label  # slides 4k, 4k+2 share a case (negative), 4k+1, 4k+3 too (positive)
        split = ("train", "train", "train", "val", "test")[(i // 4) % 5] if i < 32 else "test"
        rows.append({"slide_id": sid, "case_id": f"c{case}", "label": ("neg", "pos")[label], "index_label": label,
                     "split": split, "time": float(10 + 20 * (1 - label) + i % 3), "event": int(i % 3 != 0)})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return {"root": root, "features": features, "manifest": manifest, "table": pd.DataFrame(rows)}


def _train(cohort, out, *extra):
    return main(["train", "--manifest", str(cohort["manifest"]), "--features", str(cohort["features"]),
                 "--out", str(out), *FAST, *extra])


def _finite_metrics(path):
    metrics = json.loads(path.read_text())
    assert metrics["val"] and metrics["test"]
    assert all(np.isfinite(v) for v in [*metrics["val"].values(), *metrics["test"].values()])
    return metrics


def test_kfold_writes_every_output_learns_and_eval_reproduces_test_predictions(cohort, tmp_path):
    out = tmp_path / "cv"
    assert _train(cohort, out, "--folds", "3", "--seeds", "0", "1", "--save-attention") == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["seed"].astype(str).tolist() == ["0", "0", "0", "1", "1", "1", "mean", "sd"]
    runs = summary.iloc[:6]
    assert summary.loc[6, "test_auc"] == pytest.approx(runs["test_auc"].mean())
    assert summary.loc[7, "test_auc"] == pytest.approx(runs["test_auc"].std(ddof=1))
    assert summary.loc[6, "test_auc"] > 0.9  # the shifted instances are easy to find
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "train" and run["resolved_device"] == "cpu" and "git" in run and "packages" in run
    fold = out / "seed0" / "fold0"
    for name in ("metrics.json", "predictions.csv", "history.csv", "checkpoint.pt"):
        assert (fold / name).is_file()
    assert not list(out.rglob("*.tmp"))
    metrics = _finite_metrics(fold / "metrics.json")
    predictions = pd.read_csv(fold / "predictions.csv")
    assert set(predictions["split"]) == {"val", "test"} and metrics["n_test"] == (predictions["split"] == "test").sum()
    assert {"slide_id", "target", "prob_0", "prob_1", "prediction", "target_class"} <= set(predictions.columns)
    test_ids = set(predictions.loc[predictions["split"] == "test", "slide_id"])
    assert not test_ids & set(predictions.loc[predictions["split"] == "val", "slide_id"])
    attention = np.load(fold / "attention" / f"{sorted(test_ids)[0]}.npy")
    assert attention.ndim == 2 and np.isfinite(attention).all()
    # every fold's test slides together are the cohort once per seed
    tests = [pd.read_csv(out / "seed1" / f"fold{f}" / "predictions.csv").query("split == 'test'") for f in range(3)]
    assert sorted(pd.concat(tests)["slide_id"]) == sorted(cohort["table"]["slide_id"])

    evaluated = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(fold / "checkpoint.pt"), "--manifest", str(cohort["manifest"]),
                 "--features", str(cohort["features"]), "--out", str(evaluated), "--quiet"]) == 0
    again = pd.read_csv(evaluated / "predictions.csv").set_index("slide_id")
    assert len(again) == N_SLIDES and (evaluated / "run.json").is_file()
    trained = predictions[predictions["split"] == "test"].set_index("slide_id")
    for column in ("prob_0", "prob_1", "prediction", "target"):
        assert (again.loc[trained.index, column] == trained[column]).all(), column
    assert np.isfinite(json.loads((evaluated / "metrics.json").read_text())["metrics"]["auc"])


def test_split_column_with_index_labels_and_a_yaml_config(cohort, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"manifest: {cohort['manifest']}\nfeatures: {cohort['features']}\nmodel: mean_pooling\n"
                      f"label_column: index_label\nsplit_column: split\nout: {tmp_path / 'out'}\nepochs: 3\n")
    assert main(["train", "--config", str(config), "--model", "abmil", "--set", "epochs=6", "--quiet"]) == 0
    fold = tmp_path / "out" / "seed0" / "fold0"
    metrics = _finite_metrics(fold / "metrics.json")
    assert metrics["epochs_run"] == 6 and metrics["n_test"] == int((cohort["table"]["split"] == "test").sum())
    checkpoint = torch.load(fold / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"] == "abmil" and checkpoint["in_dim"] == DIM and checkpoint["n_out"] == 2
    assert checkpoint["task"]["classes"] == [0, 1] and not list((tmp_path / "out").glob("seed1"))


def test_clam_splits_csv_file_and_folder(cohort, tmp_path):
    ids = cohort["table"]["slide_id"].tolist()
    folder = tmp_path / "splits"
    folder.mkdir()
    for k in range(2):
        rotated = ids[k * 12:] + ids[: k * 12]
        parts = {"train": rotated[:24], "val": rotated[24:28], "test": rotated[28:36]}  # cases stay together
        ragged = pd.DataFrame({p: pd.Series(v) for p, v in parts.items()})  # blanks below the shorter columns
        ragged.to_csv(folder / f"splits_{k}.csv")  # CLAM writes its index column first
    assert _train(cohort, tmp_path / "one", "--splits-csv", str(folder / "splits_1.csv")) == 0
    assert _train(cohort, tmp_path / "all", "--splits-csv", str(folder)) == 0
    summary = pd.read_csv(tmp_path / "all" / "summary.csv")
    assert summary["fold"].tolist()[:2] == [0, 1] and len(summary) == 4
    test = pd.read_csv(tmp_path / "all" / "seed0" / "fold1" / "predictions.csv").query("split == 'test'")
    assert sorted(test["slide_id"]) == sorted(ids[4:12])


def test_survival_with_time_and_event_columns(cohort, tmp_path):
    assert _train(cohort, tmp_path / "surv", "--task", "survival", "--split-column", "split") == 0
    metrics = _finite_metrics(tmp_path / "surv" / "seed0" / "fold0" / "metrics.json")
    assert set(metrics["test"]) == {"c_index"}
    fold = tmp_path / "surv" / "seed0" / "fold0"
    predictions = pd.read_csv(fold / "predictions.csv")
    assert {"time", "event", "bin", "risk"} <= set(predictions.columns)
    assert main(["eval", "--checkpoint", str(fold / "checkpoint.pt"), "--manifest", str(cohort["manifest"]),
                 "--features", str(cohort["features"]), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    again = pd.read_csv(tmp_path / "e" / "predictions.csv").set_index("slide_id")
    trained = predictions.set_index("slide_id")
    assert (again.loc[trained.index, ["risk", "bin"]] == trained[["risk", "bin"]]).all().all()  # same bin edges


def test_survival_bin_edges_from_the_whole_cohort_are_an_option_run_json_records(cohort, tmp_path):
    from milstudy.train.losses import survival_bins

    assert _train(cohort, tmp_path / "c", "--task", "survival", "--split-column", "split",
                  "--set", "survival_bin_edges=cohort") == 0
    table = cohort["table"]
    want = survival_bins(table["time"].to_numpy(float), table["event"].to_numpy(float), 4)
    edges = torch.load(tmp_path / "c" / "seed0" / "fold0" / "checkpoint.pt", weights_only=False)["task"]["bin_edges"]
    np.testing.assert_allclose(edges, want)
    assert json.loads((tmp_path / "c" / "run.json").read_text())["settings"]["survival_bin_edges"] == "cohort"
    assert _train(cohort, tmp_path / "bad", "--task", "survival", "--split-column", "split",
                  "--set", "survival_bin_edges=all") == 2


def test_cohort_bin_edges_survive_the_training_split_and_train_edges_follow_it():
    from milstudy.train.two_stage_runs import make_task

    spec = {"task": "survival", "n_bins": 2, "survival_loss": "nll"}
    train = [(float(t), 1) for t in range(1, 11)]  # times 1..10; the test split has times 100..109
    cohort = train + [(float(t), 1) for t in range(100, 110)]
    from_train = make_task(spec, None).prepare(train, None)
    from_cohort = make_task({**spec, "survival_bin_edges": "cohort"}, None, cohort).prepare(train, None)
    assert from_train.bin_edges[1] < 11 < from_cohort.bin_edges[1]  # the median of 1..10 vs of all 20 times


def test_device_auto_resolves_to_cpu_here_and_to_cuda_on_a_gpu_node(cohort, tmp_path, monkeypatch, caplog):
    assert resolve_device_name("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_name("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device_name("cuda")
    with caplog.at_level(logging.INFO, logger="milstudy"):
        assert main(["train", "--manifest", str(cohort["manifest"]), "--features", str(cohort["features"]),
                     "--out", str(tmp_path / "o"), "--model", "mean_pooling", "--epochs", "1",
                     "--split-column", "split"]) == 0
    assert "device: cpu" in caplog.text
    assert not logging.getLogger("milstudy").handlers  # the command's logging is undone when it returns
    assert json.loads((tmp_path / "o" / "seed0" / "fold0" / "metrics.json").read_text())["device"] == "cpu"


def _error(capsys, argv):
    """Exit 2 and exactly one ``error:`` line, the last on stderr (log lines may precede it); returns it."""
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    return lines[-1]


def test_bad_input_is_one_line_and_exit_2(cohort, tmp_path, capsys):
    base = ["train", "--manifest", str(cohort["manifest"]), "--out", str(tmp_path / "o"), "--epochs", "1", "--quiet"]
    err = _error(capsys, [*base, "--features", str(tmp_path / "nowhere"), "--model", "abmil", "--folds", "3"])
    assert "--features" in err and "nowhere" in err and "does not exist" in err

    feats = ["--features", str(cohort["features"])]
    err = _error(capsys, [*base, *feats, "--model", "abmill", "--folds", "3"])
    assert "unknown model 'abmill'" in err and "did you mean 'abmil'" in err

    splits = tmp_path / "splits_0.csv"
    pd.DataFrame({"train": ["s00", "s01", "s02"], "val": ["s03", "s99", ""], "test": ["s04", "", ""]}).to_csv(
        splits, index=False)
    err = _error(capsys, [*base, *feats, "--model", "abmil", "--splits-csv", str(splits)])
    assert f"{splits} line 3 column 'val': slide 's99' is not in the manifest" in err

    err = _error(capsys, [*base, *feats, "--model", "abmil", "--folds", "3", "--split-column", "split"])
    assert "exactly one split source" in err

    gap = tmp_path / "gap.csv"
    table = cohort["table"].copy()
    table.loc[3, "slide_id"] = "ghost"
    table.to_csv(gap, index=False)
    err = _error(capsys, ["train", "--manifest", str(gap), *feats, "--model", "abmil", "--folds", "3",
                          "--out", str(tmp_path / "o"), "--quiet"])
    assert f"{gap} line 5 (slide 'ghost'): no feature file ghost.h5" in err

    assert _train(cohort, tmp_path / "ok", "--split-column", "split", "--epochs", "1") == 0
    odd = tmp_path / "odd.csv"
    table = cohort["table"].copy()
    table.loc[6, "label"] = "maybe"
    table.to_csv(odd, index=False)
    checkpoint = tmp_path / "ok" / "seed0" / "fold0" / "checkpoint.pt"
    err = _error(capsys, ["eval", "--checkpoint", str(checkpoint), "--manifest", str(odd), *feats,
                          "--out", str(tmp_path / "e")])
    assert f"{odd} line 8 (slide 's06'): label 'maybe' is not one of the classes ['neg', 'pos']" in err
    assert str(checkpoint) in err


def test_feature_folder_layouts(tmp_path):
    from milstudy.train.two_stage_inputs import resolve_feature_dir

    bag = np.zeros((2, DIM))
    ours = tmp_path / "ours"
    ours.mkdir()
    _write_bag(ours / "a.h5", bag)
    assert resolve_feature_dir(ours) == ours
    clam = tmp_path / "clam"
    for sub in ("h5_files", "pt_files"):
        (clam / sub).mkdir(parents=True)
    torch.save(torch.zeros(2, DIM), clam / "pt_files" / "a.pt")
    assert resolve_feature_dir(clam) == clam / "pt_files"
    _write_bag(clam / "h5_files" / "a.h5", bag)
    assert resolve_feature_dir(clam) == clam / "h5_files"  # coordinates too
    trident = tmp_path / "trident"
    (trident / "features_uni_v1").mkdir(parents=True)
    _write_bag(trident / "features_uni_v1" / "a.h5", bag)
    assert resolve_feature_dir(trident) == trident / "features_uni_v1"
    (trident / "features_conch_v15").mkdir()
    _write_bag(trident / "features_conch_v15" / "a.h5", bag)
    with pytest.raises(ValueError, match="several encoders"):
        resolve_feature_dir(trident)
    with pytest.raises(ValueError, match="no feature files"):
        resolve_feature_dir(tmp_path / "clam" / "h5_files" / ".." / ".." / "trident" / "features_uni_v1" / ".." / "..")


def test_settings_are_checked_before_any_data_is_read(cohort, tmp_path, capsys):
    base = ["train", "--manifest", str(cohort["manifest"]), "--features", str(cohort["features"]),
            "--model", "abmil", "--folds", "3", "--quiet", "--out", str(tmp_path / "o")]
    assert "unknown setting 'epoch'; did you mean 'epochs'?" in _error(capsys, [*base, "--set", "epoch=3"])
    assert "epochs must be int" in _error(capsys, [*base, "--set", "epochs=abc"])
    assert "missing setting 'model'" in _error(capsys, ["train", "--folds", "3", "--manifest", "m.csv",
                                                        "--features", "f", "--out", "o"])
    assert "--model-kw" in _error(capsys, [*base, "--model-kw", "no_such_option=1"])
    err = _error(capsys, [*base, "--set", "folds=40"])
    assert "--folds 40" in err and "only 18 cases" in err
    assert not (tmp_path / "o").exists()


def test_labels_are_checked_against_declared_or_inferred_classes(cohort, tmp_path, capsys):
    base = ["train", "--features", str(cohort["features"]), "--model", "abmil", "--split-column", "split",
            "--out", str(tmp_path / "o"), "--quiet"]
    err = _error(capsys, [*base, "--manifest", str(cohort["manifest"]), "--classes", "neg", "positive"])
    assert f"{cohort['manifest']} line 3 (slide 's01'): label 'pos' is not one of the classes ['neg', 'positive']" in err
    typo = tmp_path / "typo.csv"
    table = cohort["table"].copy()
    table.loc[9, "label"] = "pso"
    table.to_csv(typo, index=False)
    err = _error(capsys, [*base, "--manifest", str(typo)])
    assert f"{typo} line 11 (slide 's09'): label 'pso' occurs only once" in err
    table.loc[9, "label"] = ""
    table.to_csv(typo, index=False)
    assert "line 11 (slide 's09'): column 'label' is empty" in _error(capsys, [*base, "--manifest", str(typo)])


def test_selection_never_sees_the_test_labels(cohort, tmp_path):
    flipped = tmp_path / "flipped.csv"
    table = cohort["table"].copy()
    test = table["split"] == "test"
    table.loc[test, "label"] = table.loc[test, "label"].map({"neg": "pos", "pos": "neg"})
    table.to_csv(flipped, index=False)
    assert _train(cohort, tmp_path / "a", "--split-column", "split") == 0
    assert main(["train", "--manifest", str(flipped), "--features", str(cohort["features"]), "--out",
                 str(tmp_path / "b"), *FAST, "--split-column", "split"]) == 0
    a, b = (torch.load(tmp_path / r / "seed0" / "fold0" / "checkpoint.pt", weights_only=True) for r in "ab")
    assert a["best_epoch"] == b["best_epoch"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    auc = [json.loads((tmp_path / r / "seed0" / "fold0" / "metrics.json").read_text())["test"]["auc"] for r in "ab"]
    assert auc[0] == pytest.approx(1 - auc[1])


def _torchmil_folder(root, table, features_dir):
    """A torchmil ``ProcessedMILDataset`` folder (torchmil/datasets/processed_mil_dataset.py, Franblueee/torchmil
    @cf94851): ``features/``, ``labels/``, ``inst_labels/``, ``coords/`` with one ``<bag>.npy`` each."""
    for sub in ("features", "labels", "inst_labels", "coords"):
        (root / sub).mkdir(parents=True)
    for row in table.itertuples():
        with h5py.File(features_dir / f"{row.slide_id}.h5") as handle:
            features, coords = handle["features"][()], handle["coords"][()]
        np.save(root / "features" / f"{row.slide_id}.npy", features)
        np.save(root / "labels" / f"{row.slide_id}.npy", np.array([row.index_label]))
        np.save(root / "inst_labels" / f"{row.slide_id}.npy", np.zeros(len(features), np.int64))
        np.save(root / "coords" / f"{row.slide_id}.npy", coords)


def test_a_torchmil_folder_trains_with_a_manifest_from_its_labels(cohort, tmp_path):
    from milstudy.data.bags import BagDataset
    from milstudy.data.torchmil_layout import torchmil_manifest

    root = tmp_path / "torchmil"
    _torchmil_folder(root, cohort["table"], cohort["features"])
    manifest = torchmil_manifest(root)
    assert manifest["label"].tolist() == cohort["table"]["index_label"].tolist()
    bag = BagDataset(manifest, root / "features")[0]
    assert bag.coords is not None and bag.instance_labels is not None and bag.features.dtype == torch.float32
    manifest.merge(cohort["table"][["slide_id", "split"]]).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "run"
    assert main(["train", "--manifest", str(tmp_path / "m.csv"), "--features", str(root), "--split-column", "split",
                 "--out", str(out), *FAST]) == 0
    assert json.loads((out / "seed0" / "fold0" / "metrics.json").read_text())["test"]["auc"] > 0.9
    (root / "labels" / "s00.npy").unlink()
    with pytest.raises(FileNotFoundError, match="bag 's00' has features but no label file"):
        torchmil_manifest(root)


@pytest.mark.parametrize("name", ["longmil_bracs_3class", "longmil_bracs_7class", "longmil_tcga_brca_subtyping",
                                  "longmil_tcga_brca_survival"])
def test_the_longmil_paper_presets_are_valid_settings_that_flags_override(name, tmp_path):
    from milstudy.cli import build_parser
    from milstudy.models import build_model
    from milstudy.train.two_stage_cli import train_settings

    args = build_parser().parse_args(["train", "--preset", name, "--features", str(tmp_path), "--out",
                                      str(tmp_path / "o"), "--set", "epochs=3"])
    spec = train_settings(args)  # every key known, one split source, the manifest in data_manifests/
    assert spec["model"] == "longmil" and spec["epochs"] == 3 and spec["lr"] == 1e-4
    assert pd.read_csv(spec["manifest"], nrows=1).shape[0] == 1
    if spec.get("classes"):
        labels = set(pd.read_csv(spec["manifest"])[spec["label_column"]])
        assert labels == set(spec["classes"])  # the declared classes are the manifest's
    build_model(spec["model"], 16, 2, **spec["model_kw"])
    baseline = train_settings(build_parser().parse_args(["train", "--preset", name, "--model", "abmil", "--features",
                                                         str(tmp_path), "--out", str(tmp_path / "b")]))
    assert baseline["model"] == "abmil" and baseline["weight_decay"] == 1e-2


def test_an_unknown_preset_is_refused_naming_the_known_ones(tmp_path, capsys):
    assert main(["train", "--preset", "longmil_camelyon", "--features", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "longmil_bracs_3class" in capsys.readouterr().err
