"""Real cohorts for the ASMIL notebooks (specs/asmil.md §5, paper profile): feature bags of a manifest's slides
(``milstudy features extract`` writes them; any folder of ``<slide_id>.h5`` files with ``features`` and
``coords`` works) in place of the synthetic world of :func:`milstudy.papers.asmil.asmil_bags`.

``manifest_bags(manifest, feature_dir, target="label")`` returns the same :class:`AsmilData` (bags per split, a
classification task) so that notebooks 20 and 23 run unchanged on it: CAMELYON-16 (``label`` normal / tumour, the
official 270 / 129 split as ``split`` train / test), CAMELYON-17 (a centre split as ``split``), or BRACS
(``data_manifests/bracs.csv``: ``label_3`` with ``classes`` declared, 3 classes as in the paper's tables, whose AUC
claims are then the macro one-vs-rest AUC; or ``positive=["malignant"]`` for malignant vs the rest). Without
validation rows, about ``val_share`` of the training slides becomes the validation split (whole patients,
stratified by the target, seeded: ``milstudy.data.manifests.patient_split``); every split must hold every class. Instance labels (for localization) come with the feature files or from
``instance_label_dir``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from milstudy.papers.asmil import AsmilData

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestSource:
    """Where a real cohort's bags came from (provenance in place of a synthetic world's knobs)."""

    manifest: str
    feature_dir: str
    target: str
    positive: tuple[str, ...] | None

    def digest(self) -> str:
        """A short hash of the manifest file's bytes (or its path) and the settings."""
        path = Path(self.manifest)
        content = path.read_bytes() if path.is_file() else self.manifest.encode()
        settings = repr((self.feature_dir, self.target, self.positive)).encode()
        return hashlib.sha256(content + settings).hexdigest()[:12]


def target_mapping(classes: list, positive: Sequence[str] | None, source: str, target: str) -> dict[int, int]:
    """Map the dataset's class indices to the task's: as they are, or ``positive`` classes -> 1, the rest -> 0."""
    if positive is None:
        return {i: i for i in range(len(classes))}
    unknown = sorted(set(map(str, positive)) - set(map(str, classes)))
    if unknown or not positive:
        raise ValueError(f"{source}: positive classes {unknown or list(positive)} are not among {classes} "
                         f"(column {target!r})")
    chosen = set(map(str, positive))
    mapping = {i: int(str(c) in chosen) for i, c in enumerate(classes)}
    if len(set(mapping.values())) < 2:
        raise ValueError(f"{source}: positive={list(positive)} leaves no negative class among {classes}")
    return mapping


def manifest_bags(manifest: str | os.PathLike, feature_dir: str | os.PathLike, target: str = "label",
                  classes: Sequence | None = None, positive: Sequence[str] | None = None,
                  instance_label_dir: str | os.PathLike | None = None, val_share: float = 0.15,
                  seed: int = 1) -> AsmilData:
    """The bags of a manifest's slides per split (module docstring). ``classes``: the labels of ``target`` (string
    labels must be declared, e.g. ``["benign", "atypical", "malignant"]`` for BRACS' ``label_3``); ``seed`` draws
    the validation slides when the manifest has none. Raises naming the manifest when a split is missing or a
    split lacks a class."""
    from milstudy.data.bags import Bag, BagDataset
    from milstudy.train.tasks import ClassificationTask

    if not 0 < val_share < 1:
        raise ValueError(f"manifest_bags: val_share must be in (0, 1), got {val_share}")
    source = str(manifest)
    dataset = BagDataset(manifest, feature_dir, target=target, classes=classes, lazy=False,
                         instance_label_dir=instance_label_dir)
    if "split" not in dataset.manifest:
        raise ValueError(f"{source}: needs a 'split' column (train / val / test) for the ASMIL notebooks")
    to_task = target_mapping(list(dataset.classes), positive, source, target)
    splits = dataset.manifest["split"].astype(str).to_numpy()  # train / val / test (the manifest loader checks)
    bags = []
    for i in range(len(dataset)):
        bag = dataset[i]
        bags.append(Bag(bag.features, bag.slide_id, to_task[int(bag.target)], bag.coords, bag.instance_labels,
                        bag.case_id))
    n_classes = len(set(to_task.values()))
    if "val" not in set(splits):
        splits = _carve_validation(dataset.manifest, splits, [b.target for b in bags], val_share, seed)
    out = {split: [b for b, s in zip(bags, splits) if s == split] for split in SPLITS}
    for split, members in out.items():
        labels = {b.target for b in members}
        if labels != set(range(n_classes)):
            raise ValueError(f"{source}: the {split} split needs slides of every class (0..{n_classes - 1}), has "
                             f"{sorted(labels)} ({len(members)} slides)")
    return AsmilData(out, ClassificationTask(classes=n_classes), ManifestSource(source, str(feature_dir), target,
                                               None if positive is None else tuple(map(str, positive))))


def _carve_validation(table, splits: np.ndarray, targets: Sequence[int], share: float, seed: int) -> np.ndarray:
    """``splits`` with about ``share`` of the training slides set to "val": whole patients (``case_id``; the slide
    where there is none), stratified by the task's target (:func:`milstudy.data.manifests.patient_split`)."""
    from milstudy.data.manifests import patient_split

    frame = pd.DataFrame({"case_id": table["case_id"] if "case_id" in table else table["slide_id"],
                          "target": list(targets), "split": splits}).astype({"case_id": str})
    train = frame["split"] == "train"
    carved = patient_split(frame[train], val=share, test=0.0, stratify="target", seed=seed)
    out = splits.copy()
    out[train.to_numpy()] = carved["split"].to_numpy(str)
    return out
