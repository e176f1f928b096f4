"""Manifest schema validation (errors name file, line and column) and patient-level splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milstudy.data.manifests import (
    ManifestError,
    check_slides,
    fold_columns,
    load_manifest,
    patient_kfold,
    patient_split,
    resolve_paths,
)


def _write(tmp_path, text: str):
    path = tmp_path / "cohort.csv"
    path.write_text(text)
    return path


GOOD = "slide_id,case_id,path,label,survival_months,event,split\n" \
       "s1,c1,a/s1.svs,IDC,10.5,1,train\n" \
       "s2,c1,a/s2.svs,IDC,10.5,1,train\n" \
       "s3,c2,/abs/s3.svs,ILC,3,0,test\n"


def test_valid_manifest_types_and_path_resolution(tmp_path):
    df = load_manifest(_write(tmp_path, GOOD))
    assert df["event"].dtype == np.int64 and df["survival_months"].dtype == np.float64
    assert df["path"].tolist() == ["a/s1.svs", "a/s2.svs", "/abs/s3.svs"]
    resolved = load_manifest(_write(tmp_path, GOOD), slide_root="/data")
    assert resolved["path"].tolist() == ["/data/a/s1.svs", "/data/a/s2.svs", "/abs/s3.svs"]


def test_relative_paths_without_root_are_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("MILSTUDY_SLIDE_ROOT", raising=False)
    with pytest.raises(ManifestError, match="MILSTUDY_SLIDE_ROOT"):
        resolve_paths(load_manifest(_write(tmp_path, GOOD)))
    monkeypatch.setenv("MILSTUDY_SLIDE_ROOT", "/env")
    assert resolve_paths(load_manifest(_write(tmp_path, GOOD)))["path"][0] == "/env/a/s1.svs"


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda t: t.replace("slide_id,case_id,path", "slide_id,case_id,where"), r"cohort.csv: missing required column\(s\) \['path'\]"),
        (lambda t: t.replace("s2,c1", "s1,c1"), r"cohort.csv lines 2, 3: duplicate slide_id .*'s1'"),
        (lambda t: t.replace("IDC,10.5,1,train\ns2", "IDC,10.5,2,train\ns2"), r"cohort.csv line 2: column 'event' must be 0"),
        (lambda t: t.replace(",3,0,test", ",-3,0,test"), r"cohort.csv line 4: column 'survival_months' must be a non-negative"),
        (lambda t: t.replace(",3,0,test", ",3,0,testing"), r"cohort.csv line 4: column 'split' must be one of"),
        (lambda t: t.replace("s3,c2", "s3,c1"), r"cohort.csv lines 2, 3, 4: case 'c1' is in more than one partition of column 'split'"),
        (lambda t: t.replace("s2,c1,a/s2.svs", "s2,,a/s2.svs"), r"cohort.csv line 3: column 'case_id' is empty"),
    ],
    ids=["missing-column", "duplicate-slide", "bad-event", "negative-survival", "bad-split", "case-two-splits", "empty-case"],
)
def test_validation_errors_name_file_row_column(tmp_path, edit, pattern):
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(_write(tmp_path, edit(GOOD)))


def test_fold_columns_are_validated_like_split():
    df = pd.DataFrame({"slide_id": ["a", "b"], "case_id": ["c", "c"], "path": ["a", "b"],
                       "fold_0": ["train", "train"], "fold_1": ["train", "test"]})
    assert fold_columns(df) == ["fold_0", "fold_1"]
    with pytest.raises(ManifestError, match=r"manifest \(DataFrame\) rows 0, 1: case 'c' .* column 'fold_1'"):
        load_manifest(df)


def test_missing_case_id_defaults_to_slide_id_when_not_required():
    df = load_manifest(pd.DataFrame({"slide_id": ["a", "b"]}), require=("slide_id",))
    assert df["case_id"].tolist() == ["a", "b"]


def _cohort(n_cases=300, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        label = "ILC" if rng.random() < 0.25 else "IDC"
        for s in range(int(rng.integers(1, 4))):
            rows.append({"slide_id": f"c{c}_s{s}", "case_id": f"c{c}", "path": f"x/{c}_{s}.svs", "label": label})
    return pd.DataFrame(rows)


def test_patient_split_properties():
    df = _cohort()
    out = patient_split(df, val=0.15, test=0.2, stratify="label", seed=3)
    assert (out.groupby("case_id")["split"].nunique() == 1).all()  # no case in two splits
    load_manifest(out)  # validates
    share = out["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.2) < 0.04 and abs(share["val"] - 0.15) < 0.04
    overall = (df["label"] == "ILC").mean()
    for part in ("train", "val", "test"):
        assert abs((out.loc[out.split == part, "label"] == "ILC").mean() - overall) < 0.05
    again = patient_split(df, val=0.15, test=0.2, stratify="label", seed=3)
    assert again["split"].tolist() == out["split"].tolist()
    other = patient_split(df, val=0.15, test=0.2, stratify="label", seed=4)
    assert other["split"].tolist() != out["split"].tolist()


def test_patient_kfold_each_case_tested_once():
    df = _cohort(120)
    out = patient_kfold(df, k=5, stratify="label", seed=0, val=0.1)
    folds = fold_columns(out)
    assert folds == [f"fold_{k}" for k in range(5)]
    load_manifest(out)
    per_case = out.drop_duplicates("case_id")
    assert ((per_case[folds] == "test").sum(axis=1) == 1).all()
    assert all((out[f] == "val").any() for f in folds)
    assert patient_kfold(df, k=5, seed=0, val=0.1)[folds].equals(out[folds])


def test_check_slides_reports_missing_and_unreadable(tmp_path):
    (tmp_path / "junk.svs").write_bytes(b"not a slide")
    df = pd.DataFrame({"slide_id": ["gone", "junk"], "case_id": ["a", "b"], "path": ["gone.svs", "junk.svs"]})
    report = check_slides(df, tmp_path, progress=False)
    assert report["status"].tolist() == ["missing", "unreadable"]
    assert report["message"][1] != ""
