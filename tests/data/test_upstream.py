"""The converted real-cohort manifests regenerate byte for byte and match the papers' counts."""

from __future__ import annotations

import pandas as pd
import pytest

from milstudy.data.manifests import load_manifest
from milstudy.data.upstream import CONVERTERS, DEFAULT_SOURCE, convert_all
from milstudy.paths import REPO_ROOT

COMMITTED = REPO_ROOT / "data_manifests"


@pytest.fixture(scope="module")
def manifests() -> dict[str, pd.DataFrame]:
    return {name: load_manifest(COMMITTED / name) for name in CONVERTERS}


@pytest.mark.skipif(not DEFAULT_SOURCE.is_dir(), reason="../shared/upstream_manifests is not available")
def test_conversion_regenerates_committed_files(tmp_path):
    for path in convert_all(DEFAULT_SOURCE, tmp_path):
        assert path.read_bytes() == (COMMITTED / path.name).read_bytes(), f"{path.name} differs from data_manifests/"


def test_brca_subtyping_counts(manifests):
    df = manifests["tcga_brca_subtyping.csv"]
    assert df["label"].value_counts().to_dict() == {"IDC": 787, "ILC": 198}
    assert df["case_id"].nunique() == 985
    table = pd.crosstab(df["label"], df["split"])
    assert table.loc["IDC"].to_dict() == {"test": 194, "train": 518, "val": 75}
    assert table.loc["ILC"].to_dict() == {"test": 40, "train": 138, "val": 20}
    # the upstream resampled file duplicates training ILC slides to 518 : 276
    assert df.loc[(df.split == "train") & (df.label == "ILC"), "oversample"].sum() == 276
    assert (df.loc[(df.split != "train") | (df.label != "ILC"), "oversample"] == 1).all()


def test_brca_survival_counts(manifests):
    df = manifests["tcga_brca_survival.csv"]
    cases = df.drop_duplicates("case_id")
    assert len(cases) == 1007 and cases["event"].sum() == 146
    assert (df.groupby("case_id")[["survival_months", "event"]].nunique() == 1).all().all()
    assert len(df) == 1073 and df["path"].str.endswith(".svs").all() and not df["slide_id"].str.endswith(".pt").any()
    tested = sum((cases[f"fold_{k}"] == "test").astype(int) for k in range(3))
    assert (tested == 1).all()  # 3-fold CV: each case tested once
    assert sorted((cases[f"fold_{k}"] == "test").sum() for k in range(3)) == [335, 336, 336]


def test_panda_counts(manifests):
    df = manifests["panda.csv"]
    assert len(df) == 10202
    assert df["split"].value_counts().to_dict() == {"train": 7143, "test": 2040, "val": 1019}
    assert df["grade"].value_counts().sort_index().tolist() == [2724, 2602, 1321, 1205, 1187, 1163]
    assert (df["grade"] == df["label"]).all()


def test_bracs_labels_and_split(manifests):
    df = manifests["bracs.csv"]
    assert len(df) == 537 and df["case_id"].nunique() == 188
    assert df["label"].value_counts().to_dict() == {
        "PB": 145, "IC": 132, "UDH": 70, "DCIS": 61, "ADH": 48, "FEA": 41, "N": 40}
    assert df["label_3"].value_counts().to_dict() == {"benign": 255, "malignant": 193, "atypical": 89}
    assert (df.groupby("case_id")["split"].nunique() == 1).all()
    share = df["split"].value_counts(normalize=True)
    assert 0.6 < share["train"] < 0.8 and 0.08 < share["val"] < 0.2 and 0.1 < share["test"] < 0.25
