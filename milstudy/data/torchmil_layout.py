"""torchmil-style bag folders (``torchmil.datasets.ProcessedMILDataset``, Franblueee/torchmil): one ``.npy`` per
bag in sibling folders, ``features/<bag>.npy`` ``[N, D]``, ``labels/<bag>.npy`` (the bag label),
``inst_labels/<bag>.npy`` ``[N]`` and ``coords/<bag>.npy`` ``[N, 2]``.

Point ``BagDataset`` (or ``milstudy train --features``) at the ``features/`` folder (or at the root holding it):
``read_npy_bag`` reads the features and picks up the sibling coordinates and instance labels. A manifest comes from
the labels folder with :func:`torchmil_manifest` (``slide_id, case_id, label``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


def _sibling(features_file: Path, folder: str) -> Path:
    return features_file.parent.parent / folder / features_file.name


def read_npy_shape(path: Path) -> tuple[int, int]:
    """(N, D) of a ``features/<bag>.npy`` file without reading it (memory-mapped header)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.size == 0:
        return 0, int(array.shape[1]) if array.ndim == 2 else 0
    if array.ndim != 2:
        raise ValueError(f"{path}: features have shape {array.shape}, expected [N, D]")
    return int(array.shape[0]), int(array.shape[1])


def read_npy_bag(path: Path) -> dict[str, np.ndarray | None]:
    """``features`` [N, D] float32 and, when the sibling folders hold them, ``coords`` [N, 2] int64 and
    ``instance_labels`` [N] int64 (``allow_pickle=False``: no code runs on load)."""
    features = np.load(path, allow_pickle=False).astype(np.float32, copy=False)
    coords_file, labels_file = _sibling(path, "coords"), _sibling(path, "inst_labels")
    coords = np.load(coords_file, allow_pickle=False).astype(np.int64) if coords_file.is_file() else None
    labels = np.load(labels_file, allow_pickle=False).reshape(-1).astype(np.int64) if labels_file.is_file() else None
    return {"features": features, "coords": coords, "instance_labels": labels}


def torchmil_manifest(root: str | os.PathLike, labels: str = "labels", features: str = "features") -> pd.DataFrame:
    """``slide_id, case_id, label`` for every bag of ``root/features`` from ``root/labels/<bag>.npy`` (a scalar
    or a one-element array); a bag without a label file is an error naming it."""
    root = Path(root)
    names = sorted(p.stem for p in (root / features).glob("*.npy"))
    if not names:
        raise FileNotFoundError(f"{root / features}: no <bag>.npy feature files (torchmil layout)")
    rows = []
    for name in names:
        label_file = root / labels / f"{name}.npy"
        if not label_file.is_file():
            raise FileNotFoundError(f"{label_file}: bag '{name}' has features but no label file")
        value = np.load(label_file, allow_pickle=False).reshape(-1)
        if value.size != 1:
            raise ValueError(f"{label_file}: expected one bag label, got shape {value.shape}")
        label = value[0].item()
        rows.append({"slide_id": name, "case_id": name, "label": int(label) if float(label).is_integer() else label})
    return pd.DataFrame(rows)
