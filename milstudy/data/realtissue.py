"""A real-tissue demo slide: scikit-image's immunohistochemistry image as a pyramidal TIFF read by OpenSlide.

``skimage.data.immunohistochemistry()`` (512 x 512 px, IHC-stained human colon tissue, shipped inside
scikit-image, no download) is upscaled 4x (bicubic) to 2048 x 2048 px and written as a JPEG pyramidal tiled TIFF
(4 levels) with a stated resolution of 0.25 µm/px at level 0 (i.e. the source is treated as ≈ 1 µm/px, so nuclei
are ≈ 10 µm). Tiled with 32-px patches at 0.5 µm/px it gives about 530 tissue patches (half the image is tissue); with 32 px
at 1.0 µm/px about 135. This keeps the OpenSlide path honest on real tissue in tests and the quickstart.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["REAL_TISSUE_MPP", "real_tissue_slide"]

REAL_TISSUE_MPP = 0.25
_UPSCALE = 4


def real_tissue_slide(path: str | os.PathLike | None = None) -> Path:
    """Path of the real-tissue pyramidal TIFF, built on first use (default ``cache_root()/real_tissue/ihc.tiff``)."""
    from PIL import Image
    from skimage import data

    from milstudy.data.slides import write_pyramidal_tiff
    from milstudy.paths import cache_root

    path = Path(path) if path is not None else cache_root() / "real_tissue" / f"ihc_x{_UPSCALE}.tiff"
    if path.exists():
        return path
    source = np.asarray(data.immunohistochemistry(), np.uint8)[..., :3]
    h, w = source.shape[:2]
    big = np.asarray(Image.fromarray(source).resize((w * _UPSCALE, h * _UPSCALE), Image.Resampling.BICUBIC))
    return write_pyramidal_tiff(path, big, REAL_TISSUE_MPP, compression="jpeg", quality=92, min_levels=4)
