"""A real cohort's feature bags for the LongMIL extrapolation notebook (51; specs/longmil.md §4.3 and §5, paper
profile): the paper trains on the smallest 60 % of BRACS slides and tests on the largest.

``manifest_cohort(manifest, feature_dir, target="label", classes=None, positive=None)`` reads every slide of the
manifest (``milstudy features extract`` writes the bags; any folder of ``<slide_id>.h5`` files with ``features``
and ``coords`` works) into a :class:`LengthCohort`, the shape of
:class:`milstudy.data.synthetic.motif_bags.MotifCohort` that :mod:`milstudy.papers.longmil_extrapolation` runs on:
the manifest's own split is ignored, since the study splits by bag length. The study's models are binary, so a
cohort of more classes needs ``positive`` (e.g. ``["malignant"]`` for BRACS' ``label_3``: malignant vs the rest;
the paper's 3-class F1 is not reproduced by this path). Grid steps: each bag's own smallest coordinate step
(``stride=None``), since slides scanned at different magnifications have different level-0 patch strides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from milstudy.data.bags import Bag


@dataclass
class LengthCohort:
    """Bags with coordinates, the per-bag table (slide_id, target, n_instances) and where they came from."""

    bags: list[Bag]
    table: pd.DataFrame
    source: str
    stride: float | None = None
    classes: list = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return self.table["n_instances"].to_numpy()


def manifest_cohort(manifest: str | os.PathLike, feature_dir: str | os.PathLike, target: str = "label",
                    classes: Sequence | None = None, positive: Sequence[str] | None = None) -> LengthCohort:
    """The bags of every slide of ``manifest`` (module docstring). ``classes``: the labels of ``target`` in order
    (string labels must be declared); ``positive``: these classes -> 1, the rest -> 0 (needed for 3+ classes).
    Raises naming the manifest when a bag has no coordinates, the labels are not binary, or a class is missing."""
    from milstudy.data.bags import BagDataset
    from milstudy.papers.asmil_cohorts import target_mapping

    source = str(manifest)
    dataset = BagDataset(manifest, feature_dir, target=target, classes=classes, lazy=False)
    mapping = target_mapping(list(dataset.classes), positive, source, target)
    if len(set(mapping.values())) != 2:
        raise ValueError(f"{source}: column {target!r} has classes {list(dataset.classes)}; the extrapolation study "
                         "is binary: pass positive=[...] (e.g. ['malignant'] for BRACS' label_3)")
    bags = []
    for i in range(len(dataset)):
        bag = dataset[i]
        if bag.coords is None:
            raise ValueError(f"{source}: slide {bag.slide_id!r} has no patch coordinates; the position-aware models "
                             "need them (use .h5 bags with a coords dataset: `milstudy features extract`)")
        bags.append(Bag(bag.features, bag.slide_id, mapping[int(bag.target)], bag.coords, bag.instance_labels,
                        bag.case_id))
    table = pd.DataFrame({"slide_id": [b.slide_id for b in bags], "target": [int(b.target) for b in bags],
                          "n_instances": [len(b) for b in bags]})
    present = set(table["target"])
    if present != {0, 1}:
        raise ValueError(f"{source}: the bags hold only class {sorted(present)} of 0/1 (column {target!r}, "
                         f"positive={positive}); both are needed")
    return LengthCohort(bags, table, source, None, list(dataset.classes))


# The paper's real-data settings (specs/longmil.md §5) for ``milstudy train --preset NAME --features DIR``: two-stage
# LongMIL on a cohort's feature bags; ``--model abmil`` (or any zoo model) runs a baseline on the same setting.
# Paper: batch 1 WSI, lr 1e-4, weight decay 1e-2, 5 seeds (BRACS), local radius 10, 2 local blocks, 1 head, no
# dropout (the model's paper preset). Our choices where the paper is silent: AdamW, 50 epochs, 1 warmup epoch,
# selection on the validation split's primary metric (macro-AUC, C-index), 4 survival bins from each training split;
# TCGA-BRCA folds are our stratified case-level k-fold (the HIPT splits the paper uses are not public here).
_SPEC5 = {"model": "longmil", "epochs": 50, "lr": 1e-4, "weight_decay": 1e-2, "optimizer": "adamw",
          "warmup_epochs": 1.0, "monitor": "auto"}
TRAIN_PRESETS = {
    "longmil_bracs_3class": {**_SPEC5, "manifest": "data_manifests/bracs.csv", "label_column": "label_3",
                             "classes": ["benign", "atypical", "malignant"], "split_column": "split",
                             "seeds": [0, 1, 2, 3, 4]},
    "longmil_bracs_7class": {**_SPEC5, "manifest": "data_manifests/bracs.csv", "label_column": "label",
                             "classes": ["N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC"], "split_column": "split",
                             "seeds": [0, 1, 2, 3, 4]},
    "longmil_tcga_brca_subtyping": {**_SPEC5, "manifest": "data_manifests/tcga_brca_subtyping.csv",
                                    "classes": ["IDC", "ILC"], "folds": 10, "seeds": [0]},
    "longmil_tcga_brca_survival": {**_SPEC5, "manifest": "data_manifests/tcga_brca_survival.csv",
                                   "task": "survival", "n_bins": 4, "survival_loss": "nll", "folds": 5, "seeds": [0]},
}
