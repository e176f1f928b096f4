"""Inputs of ``milstudy train`` / ``milstudy eval`` (two-stage): feature folders, labelled manifests, split sources,
the device, atomic output files. Every check fails with one line naming the file, line, slide or parameter.

- :func:`resolve_feature_dir`: our ``<slide_id>.h5`` folder, CLAM's ``h5_files/`` / ``pt_files/``, TRIDENT's
  ``features_<encoder>/``.
- :func:`load_labelled_manifest`: the manifest with its targets checked (class labels as names or indices, or
  ``time``/``survival_months`` + ``event``) and every slide's feature file present.
- :func:`split_column_splits`, :func:`read_splits_csv`: fixed train/val/test partitions from a manifest column or
  CLAM ``splits_<k>.csv`` files (a file or a folder of them).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from milstudy.provenance import atomic_write  # noqa: F401 (used here and by two_stage_runs)

from milstudy.data.bags import feature_file
from milstudy.data.manifests import load_manifest

log = logging.getLogger("milstudy.cli")
SPLITS = ("train", "val", "test")
Split = dict[str, list[str]]  # {"train": slide ids, "val": ..., "test": ...}


# ------------------------------------------------------------------------------------------------ small helpers
def did_you_mean(value: str, known: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known spelling, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """``frame.to_csv`` (no index) atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_npy(array: np.ndarray, path: Path) -> Path:
    """``np.save`` atomically (exactly at ``path``: ``np.save`` would append ``.npy`` to the temporary name)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    return atomic_write(path, write)


def resolve_device_name(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``; ``"cuda"`` without a visible
    GPU is an error (two-stage training must not quietly fall back to the CPU)."""
    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use --device auto or --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def describe_device(name: str) -> str:
    """``cuda (NVIDIA H200)`` / ``cpu`` for the log."""
    if name.startswith("cuda"):
        return f"{name} ({torch.cuda.get_device_name(torch.device(name))})"
    return name


# ------------------------------------------------------------------------------------------------ features
def _has_features(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (".h5", ".pt", ".npy") for p in folder.iterdir())


def resolve_feature_dir(path: str | os.PathLike) -> Path:
    """The folder that holds ``<slide_id>.h5`` / ``.pt`` / ``.npy``: ``path`` itself, CLAM's ``path/h5_files``
    (preferred: it has coordinates) or ``path/pt_files``, torchmil's ``path/features``, or TRIDENT's single
    ``path/features_<encoder>``."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--features {root}: the feature folder does not exist")
    if _has_features(root):
        return root
    for sub in ("h5_files", "pt_files", "features"):
        if _has_features(root / sub):
            return root / sub
    trident = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("features_") and _has_features(p))
    if len(trident) == 1:
        return trident[0]
    if trident:
        raise ValueError(f"--features {root}: several encoders' features {[p.name for p in trident]}; point "
                         "--features at one of them")
    raise ValueError(f"--features {root}: no feature files (*.h5, *.pt, *.npy) there nor in h5_files/, "
                     "pt_files/, features/ or features_<encoder>/")


# ------------------------------------------------------------------------------------------------ manifests
def _line(source: str, index: int) -> str:
    return f"{source} line {int(index) + 2}"  # header = line 1


def _int_like(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def infer_label_classes(values: Sequence[Any], where: Sequence[str], column: str) -> list:
    """Classes of undeclared labels: integer indices forming exactly 0..C-1, or names (sorted) each seen at least
    twice (a name seen once is more likely a typo than a class); C >= 2."""
    if all(_int_like(v) for v in values):
        present = sorted({int(v) for v in values})
        if present != list(range(len(present))):
            odd = next(v for v in present if v < 0 or v >= len(present))
            i = next(i for i, v in enumerate(values) if int(v) == odd)
            raise ValueError(f"{where[i]}: label {odd} makes the class indices {present}, not 0..C-1; fix it or "
                             "declare the classes (--classes)")
        classes: list = present
    else:
        names = [str(v) for v in values]
        classes = sorted(set(names))
        counts = pd.Series(names).value_counts()
        single = [c for c in classes if counts[c] == 1]
        if single and len(values) > 2 * len(classes):
            i = names.index(single[0])
            raise ValueError(f"{where[i]}: label {single[0]!r} occurs only once in column '{column}' (classes "
                             f"found: {classes}); fix a misspelling or declare the classes (--classes ...)")
    if len(classes) < 2:
        raise ValueError(f"{where[0].rsplit(' line', 1)[0]}: column '{column}' has a single class {classes}; "
                         "classification needs at least 2")
    return classes


def label_indices(values: Sequence[Any], classes: Sequence[Any], where: Sequence[str], what: str) -> list[int]:
    """Head index of every label: a class (by value or spelling) or, for named classes, an index 0..C-1."""
    from milstudy.train.tasks import ClassificationTask

    task = ClassificationTask(classes=list(classes))
    out = []
    for value, place in zip(values, where):
        key = int(value) if _int_like(value) else value
        try:
            out.append(task.class_index(key))
        except ValueError:
            raise ValueError(f"{place}: label {value!r} is not one of the classes {list(classes)} of {what}") from None
    return out


def load_labelled_manifest(path: str | os.PathLike, feature_dir: Path, task: str, label_column: str = "label",
                           classes: Sequence[Any] | None = None, classes_from: str = "--classes"
                           ) -> tuple[pd.DataFrame, list | None]:
    """The manifest (``slide_id``, ``case_id``, ``target`` = class index, or ``survival_months`` + ``event``) and
    the class list (None for survival), every label and feature file checked; ``classes``: declared classes (the
    labels must be among them; ``classes_from`` names where they came from, for the message)."""
    source = str(path)
    table = load_manifest(path, require=("slide_id",))
    where = [f"{_line(source, i)} (slide '{sid}')" for i, sid in zip(table.index, table["slide_id"])]
    if task == "classification":
        if label_column not in table.columns:
            raise ValueError(f"{source}: no label column '{label_column}'{did_you_mean(label_column, table.columns)} "
                             f"(columns: {list(table.columns)}); set --label-column")
        values = list(table[label_column])
        for value, place in zip(values, where):
            if pd.isna(value) or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{place}: column '{label_column}' is empty; fill in the label or drop the slide")
        if classes is None:
            classes = infer_label_classes(values, where, label_column)
        classes = list(classes)
        table["target"] = label_indices(values, classes, where, classes_from)
    elif task == "survival":
        time_col = "survival_months" if "survival_months" in table.columns else "time"
        missing = [c for c in (time_col, "event") if c not in table.columns]
        if missing:
            raise ValueError(f"{source}: survival needs columns time (or survival_months) and event; missing "
                             f"{missing} (columns: {list(table.columns)})")
        times = pd.to_numeric(table[time_col], errors="coerce")
        for i, place in enumerate(where):
            if not (np.isfinite(times.iloc[i]) and times.iloc[i] >= 0):
                raise ValueError(f"{place}: column '{time_col}' must be a number >= 0, got {table[time_col].iloc[i]!r}")
            if pd.isna(table["event"].iloc[i]):
                raise ValueError(f"{place}: column 'event' is empty (0 censored, 1 event)")
        table["survival_months"] = times.astype("float64")
        classes = None
    else:
        raise ValueError(f"--task must be classification or survival, got {task!r}{did_you_mean(task, ['classification', 'survival'])}")
    absent = [i for i, sid in enumerate(table["slide_id"]) if feature_file(feature_dir, sid) is None]
    if absent:
        sid = table["slide_id"].iloc[absent[0]]
        raise FileNotFoundError(f"{where[absent[0]]}: no feature file {sid}.h5 or {sid}.pt in {feature_dir} "
                                f"({len(absent)} of {len(table)} slides missing)")
    return table, classes


# ------------------------------------------------------------------------------------------------ split sources
def _check_split(split: Split, cases: dict[str, str], source: str) -> Split:
    """No slide in two partitions, no case (patient) in two, train and val non-empty."""
    seen: dict[str, str] = {}
    case_part: dict[str, str] = {}
    for part in SPLITS:
        for sid in split[part]:
            if sid in seen:
                raise ValueError(f"{source}: slide '{sid}' is in both '{seen[sid]}' and '{part}'")
            seen[sid] = part
            case = cases[sid]
            if case_part.setdefault(case, part) != part:
                raise ValueError(f"{source}: case '{case}' has slides in '{case_part[case]}' and '{part}'; all "
                                 "slides of a patient must share one partition")
    for part in ("train", "val"):
        if not split[part]:
            raise ValueError(f"{source}: the '{part}' partition is empty (model selection needs a validation split)")
    return split


def split_column_splits(table: pd.DataFrame, column: str, source: str) -> list[Split]:
    """One fixed split from a manifest column holding train / val / test."""
    if column not in table.columns:
        raise ValueError(f"--split-column {column!r} is not a column of {source}{did_you_mean(column, table.columns)} "
                         f"(columns: {list(table.columns)})")
    values = table[column].astype("string").str.strip().str.lower().fillna("")
    for i, value in enumerate(values):
        if value not in SPLITS:
            raise ValueError(f"{_line(source, i)} (slide '{table['slide_id'].iloc[i]}'): column '{column}' must be "
                             f"train, val or test, got {table[column].iloc[i]!r}")
    ids = table["slide_id"].astype(str)
    split = {part: ids[(values == part).to_numpy()].tolist() for part in SPLITS}
    return [_check_split(split, dict(zip(ids, table["case_id"].astype(str))), f"{source} column '{column}'")]


def _split_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--splits-csv {path}: no such file or folder")
    numbered = [(int(m.group(1)), p) for p in path.iterdir() if (m := re.fullmatch(r"splits_(\d+)\.csv", p.name))]
    if not numbered:
        raise ValueError(f"--splits-csv {path}: the folder has no splits_<k>.csv files")
    return [p for _, p in sorted(numbered)]


def read_splits_csv(path: str | os.PathLike, table: pd.DataFrame, manifest: str) -> list[Split]:
    """One split per CLAM ``splits_<k>.csv`` (columns train, val, test listing slide ids, blank-padded); ``path``
    is a file or a folder of them (sorted by k). Every listed slide must be in the manifest."""
    known = set(table["slide_id"].astype(str))
    cases = dict(zip(table["slide_id"].astype(str), table["case_id"].astype(str)))
    splits = []
    for file in _split_files(Path(path)):
        try:
            frame = pd.read_csv(file, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ValueError(f"{file}: not a readable splits CSV ({str(err).strip()})") from None
        missing = [c for c in SPLITS if c not in frame.columns]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; a CLAM splits file has columns train, val, test "
                             f"(found {list(frame.columns)})")
        split: Split = {}
        for part in SPLITS:
            ids = []
            for i, value in enumerate(frame[part].str.strip()):
                if not value:
                    continue
                if value not in known:
                    raise ValueError(f"{_line(str(file), i)} column '{part}': slide '{value}' is not in the manifest "
                                     f"{manifest}{did_you_mean(value, sorted(known))}")
                ids.append(value)
            split[part] = ids
        splits.append(_check_split(split, cases, str(file)))
        unused = len(known) - sum(len(v) for v in split.values())
        if unused:
            log.info("%s: %d manifest slide(s) are in none of its partitions and are not used", file, unused)
    return splits


# ------------------------------------------------------------------------------------------------ datasets
class BagSubset(Dataset):
    """The bags of ``dataset`` at ``indices``, with ``slide_ids`` / ``targets`` known without reading features."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    @property
    def slide_ids(self) -> list[str]:
        ids = self.dataset.slide_ids
        return [str(ids[i]) for i in self.indices]

    @property
    def targets(self) -> list:
        return [self.dataset.targets[i] for i in self.indices]
