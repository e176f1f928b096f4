"""Real-cohort feature bags for the ASMIL notebooks (milstudy.papers.asmil_cohorts)."""

import h5py
import numpy as np
import pandas as pd
import pytest

from milstudy.papers import asmil as A
from milstudy.papers.asmil_cohorts import manifest_bags
from milstudy.train.two_stage import TrainConfig

LABELS = ["benign", "atypical", "malignant"]


def _cohort(tmp_path, splits, labels, n=12):
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(splits)):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        positive = labels[i] == "malignant"
        x[:3, 0] += 3.0 * positive
        with h5py.File(features / f"s{i}.h5", "w") as handle:
            handle.create_dataset("features", data=x)
            handle.create_dataset("coords", data=np.stack([np.arange(n) % 4, np.arange(n) // 4], -1) * 256)
            handle.create_dataset("instance_labels", data=(np.arange(n) < 3) * positive)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(splits))], "case_id": [f"c{i}" for i in range(len(splits))],
                  "label_3": labels, "split": splits}).to_csv(manifest, index=False)
    return manifest, features


def test_a_three_class_manifest_is_read_binary_with_positive_classes_and_a_carved_validation_split(tmp_path):
    labels = [LABELS[i % 3] for i in range(30)]
    splits = ["test" if i >= 21 else "train" for i in range(30)]
    manifest, features = _cohort(tmp_path, splits, labels)
    data = manifest_bags(manifest, features, "label_3", LABELS, positive=["malignant"])
    sizes = {s: len(b) for s, b in data.bags.items()}
    assert sizes["test"] == 9 and sizes["train"] + sizes["val"] == 21 and sizes["val"] >= 2
    truth = dict(zip([f"s{i}" for i in range(30)], labels))
    for split, bags in data.bags.items():
        assert {b.target for b in bags} == {0, 1}
        for bag in bags:
            assert bag.target == int(truth[bag.slide_id] == "malignant")
            assert bag.coords.shape == (12, 2) and int(bag.instance_labels.sum()) == 3 * bag.target
    assert manifest_bags(manifest, features, "label_3", LABELS, positive=["malignant"]).bags["val"][0].slide_id == \
        data.bags["val"][0].slide_id  # seeded
    assert len(data.world.digest()) == 12 and data.task.n_out == 2


def test_bad_manifests_get_errors_that_say_what_to_do(tmp_path):
    labels = [LABELS[i % 3] for i in range(12)]
    manifest, features = _cohort(tmp_path, ["train"] * 8 + ["test"] * 4, labels)
    with pytest.raises(ValueError, match="not among"):
        manifest_bags(manifest, features, "label_3", LABELS, positive=["tumour"])
    with pytest.raises(ValueError, match="no negative class"):
        manifest_bags(manifest, features, "label_3", LABELS, positive=LABELS)
    frame = pd.read_csv(manifest)
    frame.drop(columns="split").to_csv(tmp_path / "nosplit.csv", index=False)
    with pytest.raises(ValueError, match="nosplit.csv: needs a 'split' column"):
        manifest_bags(tmp_path / "nosplit.csv", features, "label_3", LABELS, positive=["malignant"])
    frame.assign(split=["train"] * 8 + ["holdout"] * 4).to_csv(tmp_path / "odd.csv", index=False)
    with pytest.raises(ValueError, match=r"odd.csv lines 10, 11, 12, 13: column 'split' must be one of"):
        manifest_bags(tmp_path / "odd.csv", features, "label_3", LABELS, positive=["malignant"])
    frame.assign(label_3=["malignant"] * 8 + ["benign"] * 4).to_csv(tmp_path / "oneclass.csv", index=False)
    with pytest.raises(ValueError, match=r"the train split needs slides of every class \(0..1\)"):
        manifest_bags(tmp_path / "oneclass.csv", features, "label_3", LABELS, positive=["malignant"])


def test_the_notebook_runner_trains_on_manifest_bags(tmp_path):
    labels = [LABELS[i % 3] for i in range(30)]
    manifest, features = _cohort(tmp_path, ["test" if i >= 21 else "train" for i in range(30)], labels)
    data = manifest_bags(manifest, features, "label_3", LABELS, positive=["malignant"])
    config = TrainConfig(epochs=2, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    result = A.run_dynamics(data, ["ABMIL", "ABMIL + anchor + NSF"], [0, 1], config, n_tracked=3, progress=False)
    assert set(result.predictions["slide_id"]) == {b.slide_id for b in data.bags["test"]}
    assert result.per_seed()["instance_auroc"].notna().all()
    assert len(A.dynamics_claims(result, n_resamples=200)) > 0


def test_three_classes_stay_three_and_their_auc_claims_are_macro(tmp_path):
    labels = [LABELS[i % 3] for i in range(36)]
    manifest, features = _cohort(tmp_path, ["test" if i >= 24 else "train" for i in range(36)], labels)
    data = manifest_bags(manifest, features, "label_3", LABELS)
    assert data.task.n_out == 3 and {b.target for b in data.bags["val"]} == {0, 1, 2}
    config = TrainConfig(epochs=2, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    result = A.run_dynamics(data, ["ABMIL", "ABMIL + anchor + NSF"], [0, 1], config, n_tracked=3, progress=False)
    assert {"prob_0", "prob_1", "prob_2"} <= set(result.predictions)
    table = A.dynamics_claims(result, n_resamples=200)
    assert (table.loc[table["metric"] == "auc", "n_slides"] == 12).all()


def test_the_validation_carve_out_keeps_a_patient_s_slides_together(tmp_path):
    labels = [LABELS[2 * (i // 2) % 3] for i in range(40)]  # slides 2k and 2k + 1: one patient, one class
    manifest, features = _cohort(tmp_path, ["test" if i >= 28 else "train" for i in range(40)], labels)
    frame = pd.read_csv(manifest)
    frame.assign(case_id=[f"p{i // 2}" for i in range(40)]).to_csv(manifest, index=False)
    data = manifest_bags(manifest, features, "label_3", LABELS)
    split_of = {b.slide_id: split for split, bags in data.bags.items() for b in bags}
    assert all(split_of[f"s{2 * k}"] == split_of[f"s{2 * k + 1}"] for k in range(20))
    assert 2 <= len(data.bags["val"]) <= 8 and {b.target for b in data.bags["val"]} == {0, 1, 2}
