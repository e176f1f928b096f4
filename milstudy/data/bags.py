"""Feature bags: the unit every two-stage MIL model consumes.

- ``Bag``: one slide's instance features ``[N, D]`` with coordinates, optional instance ground truth and its target.
- ``BagDataset``: a folder of per-slide HDF5 files (``<slide_id>.h5`` with datasets ``features`` and ``coords``, as
  written by ``milstudy features extract``, CLAM's ``extract_features_fp.py`` and TRIDENT; CLAM's ``.pt`` feature
  files also load) joined with a manifest; lazy by default (each item opens its file).
- (``milstudy.data.classic_mil``: the classic MIL benchmarks as ``Bag`` lists, and per-fold standardisation.)
- ``collate_bags``: pads a list of bags to the largest one with a ``mask`` (True = real instance).

Targets: an ``int`` class index for classification/grading, a float32 tensor ``[2] = (time_months, event)`` for
survival, or ``None`` (unlabelled).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

UCSB_PATH = Path(__file__).resolve().parent.parent / "resources" / "ucsb_breast_cancer.csv.gz"
SURVIVAL = "survival"


class BagError(ValueError):
    """A feature file or bag is unusable; the message names the slide / file."""


@dataclass
class Bag:
    """One slide (bag) of instances.

    features: float32 ``[N, D]``; coords: int64 ``[N, 2]`` level-0 (x, y) or None; instance_labels: int64 ``[N]``
    or None; target: int class index, float32 ``[2]`` (time, event) for survival, or None.
    """

    features: torch.Tensor
    slide_id: str
    target: Any = None
    coords: torch.Tensor | None = None
    instance_labels: torch.Tensor | None = None
    case_id: str | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, indices: torch.Tensor) -> "Bag":
        """The bag restricted to ``indices`` (features, coords and instance labels alike; target and ids kept)."""
        def take(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[indices]
        return Bag(self.features[indices], self.slide_id, self.target, take(self.coords),
                   take(self.instance_labels), self.case_id)


# ------------------------------------------------------------------------------------------------ file reading
def _squeeze_leading(array: np.ndarray, ndim: int) -> np.ndarray:
    """TRIDENT sometimes stores ``[1, N, D]``: drop leading singleton dimensions down to ``ndim``."""
    while array.ndim > ndim and array.shape[0] == 1:
        array = array[0]
    return array


def feature_file(feature_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """The feature file of a slide: ``<slide_id>.h5`` (preferred), CLAM's ``<slide_id>.pt`` or torchmil's
    ``<slide_id>.npy`` (:mod:`milstudy.data.torchmil_layout`); None if absent."""
    for suffix in (".h5", ".pt", ".npy"):
        path = Path(feature_dir) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def read_feature_shape(path: Path) -> tuple[int, int]:
    """(N, D) of a feature file without reading the data; raises ``BagError`` if it has no ``features``."""
    if path.suffix == ".npy":
        from milstudy.data.torchmil_layout import read_npy_shape

        try:
            return read_npy_shape(path)
        except ValueError as err:
            raise BagError(str(err)) from None
    if path.suffix == ".pt":
        array = _load_pt(path)
        return int(array.shape[0]), int(array.shape[1]) if array.ndim > 1 else 0
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if "features" not in handle:
                raise BagError(f"{path}: no 'features' dataset (keys: {sorted(handle.keys())}); expected an HDF5 "
                               "file with 'features' [N, D] and 'coords' [N, 2] (milstudy, CLAM or TRIDENT layout)")
            shape = handle["features"].shape
    except OSError as err:
        raise BagError(f"{path}: not a readable HDF5 file ({err}); re-extract this slide") from err
    shape = tuple(s for i, s in enumerate(shape) if not (i < len(shape) - 2 and s == 1))
    if 0 in shape:  # TRIDENT writes a slide without tissue patches as an empty (0,) array: an empty bag
        return 0, int(shape[1]) if len(shape) == 2 else 0
    if len(shape) != 2:
        raise BagError(f"{path}: 'features' has shape {shape}, expected [N, D]")
    return int(shape[0]), int(shape[1])


def _numpy_safe_globals() -> list:
    """The numpy reconstructors a pickled ``np.ndarray`` needs (TRIDENT ``saveas='pt'`` pickles numpy arrays):
    data types only, nothing that runs code, so ``weights_only`` loading stays safe."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    kinds = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")]
    return [_reconstruct, np.ndarray, np.dtype, *kinds]


def _load_pt(path: Path) -> np.ndarray:
    import pickle

    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                value = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise BagError(f"{path}: not a tensor / numpy feature file that can be loaded safely (weights_only): "
                           f"{str(err).split('.')[0]}; re-extract it as .h5 (TRIDENT: saveas='h5')") from None
    if isinstance(value, dict):
        if "features" not in value:
            raise BagError(f"{path}: no 'features' entry (keys: {sorted(value)})")
        value = value["features"]
    return _squeeze_leading(torch.as_tensor(value).numpy(), 2)


def read_feature_file(path: Path, slide_id: str | None = None) -> dict[str, np.ndarray | None]:
    """Read ``features`` [N, D] float32, ``coords`` [N, 2] int64 (or None) and ``instance_labels`` [N] (or None).

    Raises ``BagError`` naming the slide for non-finite features and inconsistent lengths.
    """
    name = slide_id or path.stem
    coords = labels = None
    if path.suffix == ".npy":
        from milstudy.data.torchmil_layout import read_npy_bag

        bag = read_npy_bag(path)
        features, coords, labels = bag["features"], bag["coords"], bag["instance_labels"]
    elif path.suffix == ".pt":
        features = _load_pt(path)
    else:
        import h5py

        read_feature_shape(path)  # clear error for a missing 'features' dataset
        with h5py.File(path, "r") as handle:
            features = _squeeze_leading(np.asarray(handle["features"][()]), 2)
            if "coords" in handle:
                coords = _squeeze_leading(np.asarray(handle["coords"][()]), 2).astype(np.int64)
            if "instance_labels" in handle:
                labels = _squeeze_leading(np.asarray(handle["instance_labels"][()]), 1).astype(np.int64)
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        bad = np.unique(np.nonzero(~np.isfinite(features))[0])
        raise BagError(f"slide '{name}' ({path}): {len(bad)} instance(s) have NaN/inf features "
                       f"(first rows {bad[:5].tolist()}); re-extract the slide or drop it from the manifest")
    for key, value in (("coords", coords), ("instance_labels", labels)):
        if value is not None and value.shape[0] != features.shape[0]:
            raise BagError(f"slide '{name}' ({path}): '{key}' has {value.shape[0]} rows but 'features' has "
                           f"{features.shape[0]}")
    return {"features": features, "coords": coords, "instance_labels": labels}


def _read_instance_labels(directory: Path, slide_id: str) -> np.ndarray:
    for suffix in (".h5", ".npy"):
        path = directory / f"{slide_id}{suffix}"
        if path.is_file():
            if suffix == ".npy":
                return np.load(path).astype(np.int64).reshape(-1)
            import h5py

            with h5py.File(path, "r") as handle:
                if "instance_labels" not in handle:
                    raise BagError(f"{path}: no 'instance_labels' dataset (keys: {sorted(handle.keys())})")
                return np.asarray(handle["instance_labels"][()]).astype(np.int64).reshape(-1)
    raise BagError(f"slide '{slide_id}': no instance label file {slide_id}.h5 or {slide_id}.npy in {directory}")


# ------------------------------------------------------------------------------------------------ datasets
class BagListDataset(Dataset):
    """An in-memory list of ``Bag`` objects (UCSB, synthetic toy bags, tests)."""

    def __init__(self, bags: Sequence[Bag]):
        self.bags = list(bags)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> Bag:
        return self.bags[index]

    @property
    def targets(self) -> list:
        return [bag.target for bag in self.bags]

    @property
    def slide_ids(self) -> list[str]:
        return [bag.slide_id for bag in self.bags]

    @property
    def n_instances(self) -> list[int]:
        return [len(bag) for bag in self.bags]


def _class_index(classes: Sequence, value, slide_id: str, where: str = "") -> int:
    for i, known in enumerate(classes):
        if value == known or str(value) == str(known):
            return i
    raise BagError(f"{where}slide '{slide_id}': label {value!r} is not one of the classes {list(classes)}; fix the "
                   "label or pass classes=[...] that include it")


class BagDataset(Dataset):
    """Bags from a folder of per-slide feature files joined with a manifest.

    ``target``: a manifest column holding the class (``"label"``, ``"grade"``, ``"label_3"``, ...), ``"survival"``
    (from ``survival_months`` and ``event``), or None. ``classes``: the class list (label -> its index); by default
    integer labels are used as indices and string labels are sorted. Pass it explicitly for subsets of a cohort.
    Slides with an empty bag are skipped and recorded in ``skipped`` (slide_id, reason) with a warning.
    ``lazy=False`` reads every bag at construction. Instance labels come from the feature file's
    ``instance_labels`` dataset or, with ``instance_label_dir``, from ``<slide_id>.h5``/``.npy`` there.
    ``by_case=True`` makes one bag per case (``case_id``): the union of its slides' instances in manifest order
    (case-level survival, e.g. ``tcga_brca_survival.csv``); the bag's ``slide_id`` is then the case id and its
    slides must share one target.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | pd.DataFrame,
        feature_dir: str | os.PathLike,
        target: str | None = "label",
        classes: Sequence | None = None,
        lazy: bool = True,
        instance_label_dir: str | os.PathLike | None = None,
        by_case: bool = False,
    ):
        from milstudy.data.manifests import load_manifest

        table = load_manifest(manifest, require=("slide_id",))
        self._source = None if isinstance(manifest, pd.DataFrame) else str(manifest)
        self.feature_dir = Path(feature_dir)
        if not self.feature_dir.is_dir():
            raise FileNotFoundError(f"feature folder {self.feature_dir} does not exist; run `milstudy features extract`")
        self.target_name = target
        self.instance_label_dir = Path(instance_label_dir) if instance_label_dir is not None else None
        if target == SURVIVAL:
            missing = [c for c in ("survival_months", "event") if c not in table.columns]
            if missing:
                raise BagError(f"survival targets need manifest column(s) {missing}")
            self.classes = None
        elif target is not None:
            if target not in table.columns:
                raise BagError(f"target column '{target}' is not in the manifest (columns: {list(table.columns)})")
            self.classes = list(classes) if classes is not None else self._default_classes(table, target)
        else:
            self.classes = None

        paths = {sid: feature_file(self.feature_dir, sid) for sid in table["slide_id"]}
        absent = [sid for sid, p in paths.items() if p is None]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of {len(table)} slides have no feature file <slide_id>.h5 in {self.feature_dir} "
                f"(e.g. {absent[:3]}); run `milstudy features extract` or remove them from the manifest")
        self.skipped: list[tuple[str, str]] = []
        rows, sizes = [], []
        for _, row in table.iterrows():
            n, dim = read_feature_shape(paths[row["slide_id"]])
            if n == 0:
                self.skipped.append((row["slide_id"], "empty bag (0 instances)"))
                continue
            rows.append(row)
            sizes.append((n, dim))
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} slide(s) with empty bags: "
                          f"{[s for s, _ in self.skipped][:5]} (see dataset.skipped)", stacklevel=2)
        self._table_index = [row.name for row in rows]  # the manifest's own row (file line - 2) of each kept slide
        self.manifest = pd.DataFrame(rows).reset_index(drop=True) if rows else table.iloc[:0]
        self.paths = [paths[sid] for sid in self.manifest["slide_id"]]
        self.n_instances = [n for n, _ in sizes]
        dims = {d for _, d in sizes}
        if len(dims) > 1:
            raise BagError(f"feature files in {self.feature_dir} have different feature dimensions {sorted(dims)}")
        self.feature_dim = dims.pop() if dims else None
        slide_targets = [self._target(row) for _, row in self.manifest.iterrows()]
        if by_case:
            cases = self.manifest["case_id"].astype(str)
            self.groups = [list(np.nonzero((cases == case).to_numpy())[0]) for case in pd.unique(cases)]
            for members in self.groups:
                first = slide_targets[members[0]]
                if any(not _same_target(first, slide_targets[m]) for m in members[1:]):
                    raise BagError(f"case '{cases.iloc[members[0]]}': its slides have different targets "
                                   f"{[slide_targets[m] for m in members]}; by_case needs one target per case")
            self.n_instances = [sum(self.n_instances[m] for m in members) for members in self.groups]
        else:
            self.groups = [[i] for i in range(len(self.manifest))]
        self.targets = [slide_targets[members[0]] for members in self.groups]
        self._slide_targets = slide_targets
        self.by_case = by_case
        self._cache = None if lazy else [self._load(i) for i in range(len(self))]

    def _where(self, index, slide_id) -> str:
        """``"<file> line N: "`` (header = line 1) or ``"manifest row N: "`` for a DataFrame manifest."""
        if self._source is not None:
            return f"{self._source} line {int(index) + 2}: "
        return f"manifest row {index}: "

    def _default_classes(self, table: pd.DataFrame, column: str) -> list:
        """Undeclared classes: only integer labels forming exactly 0..C-1 (a typo or gap must not add a class)."""
        from milstudy.train.tasks import LabelError, infer_classes

        values = [None if pd.isna(v) else v for v in table[column]]
        numeric = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        values = [int(n) if not pd.isna(n) and float(n).is_integer() else v for v, n in zip(values, numeric)]
        where = [f"{self._where(i, sid)}slide '{sid}' column '{column}'" for i, sid in zip(table.index, table["slide_id"])]
        try:
            return infer_classes(values, where, min_classes=1)
        except LabelError as err:
            raise BagError(str(err)) from None

    def _target(self, row: pd.Series):
        if self.target_name is None:
            return None
        if self.target_name == SURVIVAL:
            time, event = row["survival_months"], row["event"]
            if pd.isna(time) or pd.isna(event):
                raise BagError(f"slide '{row['slide_id']}': survival_months or event is empty")
            return torch.tensor([float(time), float(event)], dtype=torch.float32)
        value = row[self.target_name]
        where = self._where(self._table_index[row.name], row["slide_id"])
        if pd.isna(value):
            raise BagError(f"{where}slide '{row['slide_id']}': column '{self.target_name}' is empty")
        return _class_index(self.classes, value, row["slide_id"], where)

    def __len__(self) -> int:
        return len(self.groups)

    def _load(self, index: int) -> Bag:
        bags = [self._load_slide(i) for i in self.groups[index]]
        if not self.by_case:
            return bags[0]

        def join(parts):
            return None if any(p is None for p in parts) else torch.cat(parts)

        return Bag(features=torch.cat([b.features for b in bags]), slide_id=str(bags[0].case_id),
                   target=self.targets[index], coords=join([b.coords for b in bags]),
                   instance_labels=join([b.instance_labels for b in bags]), case_id=bags[0].case_id)

    def _load_slide(self, index: int) -> Bag:
        row = self.manifest.iloc[index]
        slide_id = str(row["slide_id"])
        data = read_feature_file(self.paths[index], slide_id)
        labels = data["instance_labels"]
        if self.instance_label_dir is not None:
            labels = _read_instance_labels(self.instance_label_dir, slide_id)
            if labels.shape[0] != data["features"].shape[0]:
                raise BagError(f"slide '{slide_id}': {labels.shape[0]} instance labels for "
                               f"{data['features'].shape[0]} instances")
        return Bag(
            features=torch.from_numpy(data["features"]),
            slide_id=slide_id,
            target=self._slide_targets[index],
            coords=None if data["coords"] is None else torch.from_numpy(data["coords"]),
            instance_labels=None if labels is None else torch.from_numpy(labels),
            case_id=None if pd.isna(row.get("case_id")) else str(row.get("case_id")),
        )

    def __getitem__(self, index: int) -> Bag:
        return self._cache[index] if self._cache is not None else self._load(index)

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the bags: slide ids, or case ids with ``by_case``."""
        column = "case_id" if self.by_case else "slide_id"
        return [str(self.manifest[column].iloc[members[0]]) for members in self.groups]


def _same_target(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# ------------------------------------------------------------------------------------------------ batching
def collate_bags(bags: Sequence[Bag]) -> dict[str, Any]:
    """Pad bags to the largest one.

    Returns ``features`` [B, N, D] (zeros at padding), ``mask`` [B, N] bool (True = real instance), ``coords``
    [B, N, 2] int64 (zeros where padded; None when no bag has coordinates, e.g. CLAM ``pt_files``; a batch that
    mixes bags with and without them is a ``BagError``), ``instance_labels`` [B, N] int64 (-1 where padded or
    unknown), ``targets`` (LongTensor [B], FloatTensor [B, 2] for survival, or None), ``slide_ids``, ``case_ids``.
    """
    if not bags:
        raise ValueError("collate_bags needs at least one bag")
    sizes = [len(bag) for bag in bags]
    dims = {int(bag.features.shape[1]) for bag in bags}
    if len(dims) > 1:
        raise BagError(f"bags have different feature dimensions {sorted(dims)}: {[b.slide_id for b in bags]}")
    n_max, dim = max(sizes), dims.pop()
    features = torch.zeros(len(bags), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    coords = torch.zeros(len(bags), n_max, 2, dtype=torch.int64)
    instance_labels = torch.full((len(bags), n_max), -1, dtype=torch.int64)
    has_coords = [bag.coords is not None for bag in bags]
    if any(has_coords) and not all(has_coords):
        raise BagError(f"a batch mixes bags with and without coordinates: {[b.slide_id for b in bags if b.coords is None][:3]} "
                       "have none; use one feature layout for the whole cohort (CLAM h5_files/ carry coords)")
    for i, (bag, n) in enumerate(zip(bags, sizes)):
        features[i, :n] = bag.features
        mask[i, :n] = True
        if bag.coords is not None:
            coords[i, :n] = bag.coords
        if bag.instance_labels is not None:
            instance_labels[i, :n] = bag.instance_labels
    return {
        "features": features,
        "mask": mask,
        "coords": coords if all(has_coords) else None,
        "instance_labels": instance_labels,
        "targets": _stack_targets([bag.target for bag in bags]),
        "slide_ids": [bag.slide_id for bag in bags],
        "case_ids": [bag.case_id for bag in bags],
    }


def _stack_targets(targets: list) -> torch.Tensor | None:
    if all(t is None for t in targets):
        return None
    if any(t is None for t in targets):
        raise BagError("a batch mixes labelled and unlabelled bags")
    if all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in targets):
        return torch.stack([t.float() for t in targets])
    return torch.tensor([int(t) for t in targets], dtype=torch.long)
