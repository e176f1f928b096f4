"""Fault injection (issue 11): bad input never changes a result silently, never writes outside the output
folder, never loses a finished run. Each case asserts the message, the exit code and that finished outputs
survive unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.cli import main
from milstudy.data.bag_checks import validate_bags
from milstudy.data.bags import BagDataset, BagError, BagListDataset, Bag
from milstudy.data.slides import write_pyramidal_tiff
from milstudy.train.tasks import ClassificationTask, LabelError, build_task

REPO = Path(__file__).resolve().parent.parent


def _digest(folder: Path, pattern: str = "*.h5") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob(pattern))}


def _bag(path: Path, features: np.ndarray) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features)
        handle.create_dataset("coords", data=np.zeros((len(features), 2), np.int64))


# ------------------------------------------------------------------------------ 1. labels outside the task
def test_typo_or_blank_label_is_refused_before_training():
    where = [f"cohort.csv line {i + 2} (slide s{i})" for i in range(4)]
    with pytest.raises(LabelError, match=r"cohort.csv line 5 \(slide s3\): label 'IDc' is not one of the task's "
                                         r"classes \['IDC', 'ILC'\]"):
        build_task({"type": "classification", "classes": ["IDC", "ILC"]}, ["IDC", "ILC", "ILC", "IDc"], where)
    with pytest.raises(LabelError, match=r"cohort.csv line 4 \(slide s2\): label is blank"):
        build_task(None, [0, 1, float("nan"), 1], where)
    with pytest.raises(LabelError, match=r"line 4 \(slide s2\): label 7 makes the labels \[0, 1, 7\]"):
        build_task(None, [0, 1, 7, 1], where)  # a typo'd 7 must not make an 8-class head
    with pytest.raises(LabelError, match=r"line 2 \(slide s0\): label 'IDC' is not an integer class index and no "
                                         r"classes were declared"):
        build_task(None, ["IDC", "ILC", "ILC", "IDC"], where)
    with pytest.raises(LabelError, match=r"line 3 \(slide s1\): label 3 is not one of the task's classes \[0, 1, 2\]"):
        build_task({"type": "grading", "n_grades": 3}, [0, 3], where)
    assert build_task(None, [1, 0, 1]).classes == [0, 1]
    assert build_task({"type": "grading", "n_grades": 4}, [0, 2]).n_out == 4  # declared: absent grades are fine


def test_task_accepts_class_names_or_dataset_indices(tmp_path):
    _bag(tmp_path / "a.h5", np.zeros((2, 3), np.float32))
    _bag(tmp_path / "b.h5", np.zeros((2, 3), np.float32))
    manifest = pd.DataFrame({"slide_id": ["a", "b"], "label": ["ILC", "IDC"]})
    ds = BagDataset(manifest, tmp_path, classes=["IDC", "ILC"])
    task = ClassificationTask(classes=ds.classes)
    assert task.make_targets(ds.targets).tolist() == [1, 0]
    assert task.make_targets(["ILC", "IDC"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="label 2 is not one of the task's classes"):
        task.make_targets([2])
    # int classes: an int is a class value, never an index
    assert ClassificationTask(classes=[1, 2]).make_targets([1, 2]).tolist() == [0, 1]


def test_bag_dataset_refuses_undeclared_non_contiguous_labels(tmp_path):
    for sid in ("a", "b", "c"):
        _bag(tmp_path / f"{sid}.h5", np.zeros((2, 3), np.float32))
    csv = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [0, 1, 4]}).to_csv(csv, index=False)
    with pytest.raises(BagError, match=rf"{csv} line 4: slide 'c' column 'label': label 4 makes the labels \[0, 1, 4\]"):
        BagDataset(csv, tmp_path)
    pd.DataFrame({"slide_id": ["a", "b", "c"], "label": ["A", "B", "b"]}).to_csv(csv, index=False)
    with pytest.raises(BagError, match=rf"{csv} line 4: slide 'c': label 'b' is not one of the classes"):
        BagDataset(csv, tmp_path, classes=["A", "B"])
    with pytest.raises(BagError, match=r"no classes were declared"):
        BagDataset(csv, tmp_path)
    pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [1, 0, 1]}).to_csv(csv, index=False)
    assert BagDataset(csv, tmp_path).classes == [0, 1]


# ------------------------------------------------------------------------------ 5. NaN/inf bags up front
def test_validate_bags_names_slide_and_file_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MILSTUDY_CACHE", str(tmp_path / "cache"))  # the verdict cache stays in this test's folder
    good = np.ones((4, 3), np.float32)
    _bag(tmp_path / "ok.h5", good)
    bad = good.copy()
    bad[2, 1] = np.inf
    _bag(tmp_path / "broken.h5", bad)
    manifest = pd.DataFrame({"slide_id": ["ok", "broken"], "label": [0, 1]})
    ds = BagDataset(manifest, tmp_path)  # lazy: construction does not read the features
    with pytest.raises(BagError, match=r"1 unusable bag\(s\): slide 'broken' \(.*broken.h5\): 1 instance\(s\) have "
                                       r"NaN/inf features \(first rows \[2\]\)"):
        validate_bags(ds)
    validate_bags(BagDataset(manifest.iloc[:1], tmp_path))
    validate_bags(BagDataset(manifest.iloc[:1], tmp_path))  # cached: a second pass is a stat per bag
    assert len(list((tmp_path / "cache" / "bag_checks").glob("*.ok"))) == 1  # one marker: the finite bag only
    _bag(tmp_path / "ok.h5", bad)  # the file changed: the cache must not vouch for it
    with pytest.raises(BagError, match="slide 'ok'"):
        validate_bags(BagDataset(manifest.iloc[:1], tmp_path))
    nan = torch.ones(3, 2)
    nan[1, 0] = float("nan")
    with pytest.raises(BagError, match=r"slide 'm' \(in memory\): 1 instance"):
        validate_bags(BagListDataset([Bag(features=nan, slide_id="m", target=0)]))
