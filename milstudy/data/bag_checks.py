"""Bag validation before training (project issue 11, item 5): every bag readable, finite (no NaN/inf), shaped
``[N, D]``, with one ``coords`` / ``instance_labels`` row per instance; feature files are scanned in chunks and
the verdict cached per file identity (path, size, mtime), so the check is cheap on reruns. A broken bag stops a run before its first epoch, naming the slide and file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from milstudy.data.bags import BagDataset, BagError, _load_pt, _squeeze_leading, read_feature_shape

_VALID_BAGS: dict[tuple, str] = {}  # (resolved path, size, mtime_ns) -> "" (finite) or the problem, this process
BAG_CHECK_VERSION = 2  # 2: coords / instance_labels lengths checked (a v1 marker may vouch for a short bag)


def _rows(shape: tuple[int, ...], ndim: int) -> int:
    """Rows of an array of ``shape`` once leading singleton dimensions are dropped down to ``ndim`` (TRIDENT)."""
    while len(shape) > ndim and shape[0] == 1:
        shape = shape[1:]
    return int(shape[0]) if shape else 0


def _bag_file_problem(path: Path, chunk_rows: int = 65536) -> str:
    """"" if every feature of ``path`` is finite, the file reads and its ``coords`` / ``instance_labels`` have one
    row per instance, else a short description."""
    lengths: dict[str, int] = {}
    try:
        if path.suffix in (".pt", ".npy"):
            if path.suffix == ".pt":
                features = _load_pt(path)
            else:
                from milstudy.data.torchmil_layout import read_npy_bag

                bag = read_npy_bag(path)
                features = bag["features"]
                lengths = {k: len(bag[k]) for k in ("coords", "instance_labels") if bag[k] is not None}
            n_rows = int(features.shape[0]) if features.ndim else 0
            bad = np.unique(np.nonzero(~np.isfinite(features.astype(np.float32, copy=False)))[0])
        else:
            import h5py

            n_rows = read_feature_shape(path)[0]
            bad = []
            with h5py.File(path, "r") as handle:
                lengths = {k: _rows(handle[k].shape, n) for k, n in (("coords", 2), ("instance_labels", 1))
                           if k in handle}
                data = handle["features"]
                data = data if data.ndim == 2 else None
                if data is None:  # [1, N, D] (TRIDENT): small enough to squeeze in memory
                    features = _squeeze_leading(np.asarray(handle["features"][()]), 2)
                    bad = np.unique(np.nonzero(~np.isfinite(features))[0]).tolist()
                else:
                    for start in range(0, data.shape[0], chunk_rows):  # bounded memory on 100k-patch bags
                        block = np.asarray(data[start:start + chunk_rows], dtype=np.float32)
                        bad.extend((start + np.unique(np.nonzero(~np.isfinite(block))[0])).tolist())
    except BagError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - unreadable file: a finding about the data
        return f"not readable ({type(err).__name__}: {err}); re-extract this slide"
    if len(bad):
        return (f"{len(bad)} instance(s) have NaN/inf features (first rows {list(bad[:5])}); re-extract the slide "
                "or drop it from the manifest")
    for key, rows in lengths.items():
        if rows != n_rows:
            return f"'{key}' has {rows} rows but 'features' has {n_rows}; re-extract the slide"
    return ""


def _disk_cache_file(key: tuple) -> Path:
    import hashlib
    import json

    from milstudy.paths import cache_root

    digest = hashlib.sha1(json.dumps([BAG_CHECK_VERSION, *key]).encode()).hexdigest()[:24]
    return cache_root() / "bag_checks" / f"{digest}.ok"


def check_bag_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """"" if the feature file ``path`` is readable with finite features, else what is wrong (never raises).

    Results are cached per file identity (resolved path, size, mtime): in this process, and for finite files
    as an empty marker under ``cache_root()/bag_checks/`` so that the next run pays only a ``stat`` per bag.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        return f"not readable ({err})"
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if use_cache and key in _VALID_BAGS:
        return _VALID_BAGS[key]
    marker = _disk_cache_file(key)
    if use_cache and marker.is_file():
        _VALID_BAGS[key] = ""
        return ""
    problem = _bag_file_problem(path)
    _VALID_BAGS[key] = problem
    if use_cache and not problem:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # a read-only cache only costs the next run a re-check
            pass
    return problem


def validate_bags(dataset: Dataset, use_cache: bool = True) -> None:
    """Check every bag of ``dataset`` before training: readable, finite features (NaN/inf), consistent lengths.

    ``BagDataset``: every slide's feature file is scanned (in chunks, cached per file identity, see
    :func:`check_bag_file`); other datasets (``BagListDataset``, lists of ``Bag``) are checked in memory. Raises
    ``BagError`` naming each bad slide and its file (the first five, then a count), so a broken bag stops the run
    before the first epoch instead of at test time.
    """
    problems: list[str] = []
    if isinstance(dataset, BagDataset):
        for slide_id, path in zip(dataset.manifest["slide_id"], dataset.paths):
            problem = check_bag_file(path, use_cache=use_cache)
            if problem:
                problems.append(f"slide '{slide_id}' ({path}): {problem}")
    else:
        for index in range(len(dataset)):
            bag = dataset[index]
            features = torch.as_tensor(bag.features)
            if features.ndim != 2:
                problems.append(f"slide '{bag.slide_id}' (in memory): features have shape {tuple(features.shape)}, "
                                "expected [N, D]")
            elif not bool(torch.isfinite(features).all()):
                rows = torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten()
                problems.append(f"slide '{bag.slide_id}' (in memory): {len(rows)} instance(s) have NaN/inf features "
                                f"(first rows {rows[:5].tolist()})")
            else:
                problems.extend(f"slide '{bag.slide_id}' (in memory): '{key}' has {len(value)} rows but 'features' "
                                f"has {len(features)}" for key, value in (("coords", bag.coords),
                                                                          ("instance_labels", bag.instance_labels))
                                if value is not None and len(value) != len(features))
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BagError(f"{len(problems)} unusable bag(s): " + "; ".join(problems[:5]) + more)


