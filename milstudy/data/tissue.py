"""Tissue segmentation on a low-resolution view of a slide (the CLAM-style preprocessing of every paper).

Otsu threshold on HSV saturation (background glass is white, i.e. unsaturated), morphological closing, removal
of small objects and filling of small holes (large holes, e.g. lumina or tears, stay excluded as in CLAM).
The result is a :class:`TissueMask` at the scale of the view plus its downsample (level-0 px per mask px) and
the parameters used, so that a tiling can be reproduced. A slide without tissue gives an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from milstudy.data.slides import Slide

__all__ = ["TissueMask", "segment_tissue", "choose_mask_level"]


@dataclass
class TissueMask:
    """Boolean tissue mask ``[h, w]``; pixel (i, j) covers level-0 pixels ``[j*ds_x, (j+1)*ds_x) x [i*ds_y, ...)``."""

    mask: np.ndarray
    downsample: tuple[float, float]  # (x, y) level-0 px per mask px
    params: dict = field(default_factory=dict)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())


def choose_mask_level(slide: Slide, max_size: int = 4096, min_mpp: float = 2.0) -> int:
    """The finest level that is at least ``min_mpp`` µm/px coarse and at most ``max_size`` px on its longer side
    (the last level if none qualifies): fine enough for 32-px patches at 2 µm/px, cheap on 40k-px slides."""
    for level, (w, h) in enumerate(slide.level_dimensions):
        if slide.level_mpp(level) >= min_mpp * 0.98 and max(w, h) <= max_size:
            return level
    return slide.level_count - 1


MAX_SEGMENTATION_PIXELS = 64 * 1024 * 1024  # 64 Mpx (~200 MB RGB): the most segmentation reads at once


def check_segmentation_level(slide: Slide, level: int, max_size: int = 4096) -> None:
    """Refuse (``SlideError``) a segmentation level too large to read whole, e.g. a single-level 100,000 px
    header: segmentation reads a bounded view, never a whole level 0."""
    from milstudy.data.slides import SlideError

    w, h = slide.level_dimensions[level]
    if w * h > max(MAX_SEGMENTATION_PIXELS, max_size * max_size):
        raise SlideError(
            f"{slide.path}: its smallest usable level {level} is {w} x {h} px, too large to segment (limit "
            f"{MAX_SEGMENTATION_PIXELS // 2**20} Mpx); the file has no low-resolution pyramid level or an "
            "implausible header: re-export it as a pyramidal TIFF")


def segment_tissue(
    slide_or_thumb: Slide | np.ndarray,
    *,
    max_size: int = 4096,
    min_mask_mpp: float = 2.0,
    min_saturation: float = 0.06,
    closing_um: float = 8.0,
    min_area_um2: float = 2.0e4,
    max_hole_um2: float = 4.0e3,
    thumb_mpp: float | None = None,
    thumb_downsample: tuple[float, float] = (1.0, 1.0),
) -> TissueMask:
    """Segment tissue on a slide (read at the level chosen by :func:`choose_mask_level`) or on an RGB thumbnail.

    Returns a :class:`TissueMask` (bool ``[h, w]`` + downsample + parameters).

    ``min_saturation`` floors the Otsu threshold so that an empty (all-glass) slide gives an empty mask.
    Sizes are physical (µm, µm²); for a bare thumbnail pass ``thumb_mpp`` (µm per thumbnail px) and
    ``thumb_downsample`` (level-0 px per thumbnail px), otherwise sizes are read as thumbnail pixels.
    """
    from scipy import ndimage
    from skimage import filters, morphology

    if isinstance(slide_or_thumb, Slide):
        slide = slide_or_thumb
        level = choose_mask_level(slide, max_size, min_mask_mpp)
        check_segmentation_level(slide, level, max_size)
        rgb = slide.read_level(level)
        w0, h0 = slide.dimensions
        downsample = (w0 / rgb.shape[1], h0 / rgb.shape[0])
        px_um = slide.mpp * downsample[0]
        source = {"level": level, "slide": str(slide.path)}
    else:
        rgb = np.asarray(slide_or_thumb)
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise ValueError(f"thumbnail must be RGB [h, w, 3], got shape {rgb.shape}")
        rgb = rgb[..., :3]
        downsample = (float(thumb_downsample[0]), float(thumb_downsample[1]))
        px_um = thumb_mpp if thumb_mpp is not None else 1.0
        source = {"level": None, "slide": None}

    # HSV saturation (max - min) / max, in float32 without a full HSV conversion.
    high = rgb.max(axis=2)
    saturation = (high - rgb.min(axis=2)).astype(np.float32)
    saturation /= np.maximum(high, 1).astype(np.float32)
    # Nearly black pixels (pen marks, scanner borders) are saturated noise in HSV; ignore them.
    saturation[high < 40] = 0
    if float(saturation.max() - saturation.min()) < 1e-6:
        otsu = float(saturation.max())
    else:
        otsu = float(filters.threshold_otsu(saturation))
    threshold = max(otsu, min_saturation)
    mask = saturation > threshold

    closing_px = max(0, int(round(closing_um / px_um)))
    if closing_px > 0 and mask.any():
        mask = ndimage.binary_closing(mask, structure=morphology.disk(closing_px), border_value=0)
    # Physical sizes, capped relative to the view so that tiny (synthetic, test) slides keep their tissue.
    min_area_px = max(1, min(int(round(min_area_um2 / px_um**2)), int(0.002 * mask.size)))
    max_hole_px = max(0, min(int(round(max_hole_um2 / px_um**2)), int(0.001 * mask.size)))
    if mask.any():
        mask = morphology.remove_small_objects(mask, max_size=min_area_px)
        if max_hole_px > 0:
            mask = morphology.remove_small_holes(mask, max_size=max_hole_px)
    params = {
        **source,
        "otsu_threshold": otsu,
        "threshold": threshold,
        "min_saturation": min_saturation,
        "closing_px": closing_px,
        "min_area_px": min_area_px,
        "max_hole_px": max_hole_px,
        "mask_um_per_px": px_um,
    }
    return TissueMask(mask=mask.astype(bool), downsample=downsample, params=params)
