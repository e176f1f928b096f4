"""Ground truth of label-map masks (synthetic cohorts and ``milstudy data masks``): 0 background, 1 tissue,
>= ``TUMOUR_LABEL`` tumour; per-patch tumour fractions and instance labels for any tiling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

TUMOUR_LABEL = 2  # label maps (synthetic cohorts and `milstudy data masks`): 0 background, 1 tissue, >= 2 tumour


def _read_label_map(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.exists():
        raise FileNotFoundError(
            f"{path}: ground-truth mask not found; rebuild the cohort or rerun `milstudy data masks`")
    return np.asarray(Image.open(path))


def read_tumour_mask(path: str | os.PathLike) -> np.ndarray:
    """bool tumour mask of a label-map PNG (value >= ``TUMOUR_LABEL``)."""
    return _read_label_map(Path(path)) >= TUMOUR_LABEL


def instance_labels(
    mask: np.ndarray | str | os.PathLike | pd.Series,
    coords: np.ndarray,
    patch_size_level0: float,
    mask_downsample: float | None = None,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch tumour fraction float32 ``[N]`` and instance label int64 ``[N]`` (fraction >= ``threshold``).

    ``mask``: a bool tumour mask ``[h, w]`` (then ``mask_downsample`` = level-0 px per mask px is required), a
    label-map PNG written by this module, or a cohort manifest row (``mask_path`` absolute, ``mask_downsample``).
    ``coords``: int ``[N, 2]`` level-0 (x, y) top-left of square patches of ``patch_size_level0`` px.
    Vectorised with an integral image, so it works for any tiling.
    """
    from milstudy.data.tiling import mask_fraction

    if isinstance(mask, pd.Series):
        if mask_downsample is None:
            mask_downsample = float(mask["mask_downsample"])
        mask = mask["mask_path"]
    if isinstance(mask, (str, os.PathLike)):
        array = read_tumour_mask(mask)
    else:
        array = np.asarray(mask)
        if array.dtype != bool:
            raise ValueError(
                "mask must be a bool tumour mask (True = tumour), a label-map path or a manifest row; "
                f"got dtype {array.dtype}. For a label map use `label_map >= 2`."
            )
    if mask_downsample is None:
        raise ValueError("mask_downsample (level-0 px per mask px) is required with an array mask")
    fraction = mask_fraction(array, np.asarray(coords), float(patch_size_level0), float(mask_downsample))
    return fraction, (fraction >= threshold).astype(np.int64)
