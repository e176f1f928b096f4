"""Convert the slide lists published with the papers' code (``../shared/upstream_manifests``) into ``data_manifests/``.

Sources (see ``data_manifests/README.md`` for origins, counts and the survival ``Status`` finding):
- ``e2e_wsi_abmilx/``: labels of github.com/DearCaat/E2E-WSI-ABMILX (ABMILX paper): TCGA-BRCA IDC/ILC subtyping
  (+ its resampled variant), TCGA-BRCA survival in 3 folds, PANDA ISUP grades.
- ``long_mil/bracs.csv``: github.com/invoker-LL/Long-MIL (LongMIL paper): BRACS 7 subtypes, no split.

Every output follows the ``milstudy.data.manifests`` schema with paths relative to a slide root laid out as
``tcga_brca/<slide>.svs``, ``panda/<slide>.tiff`` and ``bracs/<slide>.svs``. Conversion is deterministic: running
``convert_all`` again reproduces the committed files byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from milstudy.data.manifests import load_manifest, patient_split
from milstudy.paths import REPO_ROOT

DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "upstream_manifests"
DEFAULT_DESTINATION = REPO_ROOT / "data_manifests"

BRACS_GROUPS = {
    "N": "benign", "PB": "benign", "UDH": "benign",
    "FEA": "atypical", "ADH": "atypical",
    "DCIS": "malignant", "IC": "malignant",
}
# BRACS split fractions (of cases) follow the proportions of the official BRACS split (395 / 65 / 87 slides),
# whose assignment is not in the upstream file. Seed fixed so the committed file regenerates exactly.
BRACS_SPLIT = {"val": 0.12, "test": 0.16, "seed": 0, "stratify": "label_3"}


def _write(df: pd.DataFrame, path: Path) -> None:
    """Validate, then write atomically (temporary file in the same folder, then rename)."""
    load_manifest(df)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def convert_brca_subtyping(src: Path) -> pd.DataFrame:
    """TCGA-BRCA IDC vs ILC: one row per slide; ``oversample`` = copies of the slide in the upstream resampled file."""
    base = pd.read_csv(src / "e2e_wsi_abmilx" / "subtyping_tcga_brca.csv", dtype=str)
    resampled = pd.read_csv(src / "e2e_wsi_abmilx" / "subtyping_tcga_brca_resample.csv", dtype=str)
    copies = resampled["slide"].value_counts()
    if set(copies.index) != set(base["slide"]):
        raise ValueError("the resampled BRCA subtyping file lists other slides than the base file")
    return pd.DataFrame({
        "slide_id": base["slide"],
        "case_id": base["case"],
        "path": "tcga_brca/" + base["slide"] + ".svs",
        "label": base["label"],
        "split": base["fold"],
        "oversample": base["slide"].map(copies).astype(int),
    })


def convert_brca_survival(src: Path) -> pd.DataFrame:
    """TCGA-BRCA survival: one row per slide (cases with several slides repeat their case_id), 3 folds.

    ``survival_months`` = upstream ``Event`` (a time, despite its name); ``event`` = upstream ``Status``
    (1 = death observed: 146 cases, matching the paper; 0 = censored).
    """
    folds = [pd.read_csv(src / "e2e_wsi_abmilx" / "survival_tcga_brca_3fold" / f"fold_{k}.csv", dtype=str)
             for k in range(3)]
    first = folds[0]
    rows = []
    for _, case in first.iterrows():
        for wsi in case["WSI"].split(";"):
            slide = wsi.strip().removesuffix(".pt")
            rows.append({
                "slide_id": slide,
                "case_id": case["ID"],
                "path": f"tcga_brca/{slide}.svs",
                "survival_months": float(case["Event"]),
                "event": int(case["Status"]),
            })
    out = pd.DataFrame(rows)
    for k, fold in enumerate(folds):
        if set(fold["ID"]) != set(first["ID"]):
            raise ValueError(f"survival fold_{k}.csv lists other cases than fold_0.csv")
        split = dict(zip(fold["ID"], fold["Split"]))
        out[f"fold_{k}"] = out["case_id"].map(split)
    return out


def convert_panda(src: Path) -> pd.DataFrame:
    """PANDA ISUP grading: grade 0-5 as both ``grade`` and ``label``; the upstream train/val/test split."""
    raw = pd.read_csv(src / "e2e_wsi_abmilx" / "panda.csv", dtype=str)
    grade = raw["label"].astype(int)
    return pd.DataFrame({
        "slide_id": raw["slide"],
        "case_id": raw["case"],
        "path": "panda/" + raw["slide"] + ".tiff",
        "label": grade,
        "grade": grade,
        "split": raw["fold"],
    })


def convert_bracs(src: Path) -> pd.DataFrame:
    """BRACS: 7-class ``label``, 3-class ``label_3``; a generated patient-level split stratified on ``label_3``."""
    raw = pd.read_csv(src / "long_mil" / "bracs.csv", dtype=str)
    unknown = sorted(set(raw["label"]) - set(BRACS_GROUPS))
    if unknown:
        raise ValueError(f"bracs.csv has labels outside the BRACS subtypes {list(BRACS_GROUPS)}: {unknown}")
    df = pd.DataFrame({
        "slide_id": raw["slide_id"],
        "case_id": raw["case_id"],
        "path": "bracs/" + raw["slide_id"] + ".svs",
        "label": raw["label"],
        "label_3": raw["label"].map(BRACS_GROUPS),
    })
    cfg = BRACS_SPLIT
    return patient_split(df, val=cfg["val"], test=cfg["test"], stratify=cfg["stratify"], seed=cfg["seed"])


CONVERTERS = {
    "tcga_brca_subtyping.csv": convert_brca_subtyping,
    "tcga_brca_survival.csv": convert_brca_survival,
    "panda.csv": convert_panda,
    "bracs.csv": convert_bracs,
}


def convert_all(src: str | os.PathLike = DEFAULT_SOURCE, dst: str | os.PathLike = DEFAULT_DESTINATION) -> list[Path]:
    """Regenerate every converted manifest from ``src`` into ``dst``; returns the written paths."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"upstream manifests folder {src} does not exist (expected ../shared/upstream_manifests)")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name, convert in CONVERTERS.items():
        path = dst / name
        _write(convert(src), path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in convert_all():
        print(p)
