"""Lesion annotations (ASAP XML, the CAMELYON16/17 format) as tumour masks that give patch-level ground truth.

ASAP stores polygons in level-0 pixels: ``<Annotation Name= Type="Polygon" PartOfGroup="_0"><Coordinates>
<Coordinate Order="0" X= Y=/>...``. In CAMELYON16, groups ``_0`` and ``_1`` outline tumour and ``_2`` outlines
normal tissue inside a tumour outline (to be removed); CAMELYON17 uses ``metastases`` and ``Exclusion``-style
names the same way. :func:`rasterize_regions` fills tumour polygons, then clears the exclusion polygons, on a grid
``downsample`` times coarser than level 0. :func:`write_annotation_mask` saves that as a PNG in milstudy's
label-map convention (0 = outside, 2 = tumour; any value >= 2 is tumour), so :func:`milstudy.data.synthetic.
instance_labels`, ``milstudy data tile`` and ``milstudy features extract`` read it like a synthetic cohort's mask
(manifest columns ``mask_path`` and ``mask_downsample``).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from milstudy.data.synthetic.ground_truth import TUMOUR_LABEL

__all__ = ["EXCLUSION_GROUPS", "Region", "rasterize_regions", "read_asap_xml", "write_annotation_mask"]

EXCLUSION_GROUPS = ("_2", "Exclusion", "exclusion", "Normal", "normal")
_AREA_TYPES = ("polygon", "spline", "rectangle", "pointset")  # "dot" and "measurement" have no area


@dataclass(frozen=True)
class Region:
    """One annotation: ``name``, ``group`` (``PartOfGroup``), ``kind`` (``Type``), ``points`` float ``[K, 2]``
    level-0 (x, y) in drawing order."""

    name: str
    group: str
    kind: str
    points: np.ndarray


def read_asap_xml(path: str | os.PathLike) -> list[Region]:
    """Every annotation with an area (polygon, spline, rectangle) in an ASAP XML file; dots are skipped.

    Errors name the file and the annotation: not XML, no ``Annotation`` element, a polygon with fewer than three
    coordinates or a coordinate that is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not a readable XML file ({err})") from err
    elements = root.findall(".//Annotation")
    if not elements:
        raise ValueError(f"{path}: no <Annotation> element; is this an ASAP / CAMELYON annotation file?")
    regions = []
    for index, element in enumerate(elements):
        name = element.get("Name") or f"annotation {index}"
        kind = (element.get("Type") or "Polygon").lower()
        if kind not in _AREA_TYPES:
            continue
        coordinates = sorted(element.findall(".//Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            points = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coordinates], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: annotation {name!r} has a coordinate that is not a number ({err})") from err
        if len(points) < 3:
            raise ValueError(f"{path}: annotation {name!r} ({kind}) has {len(points)} coordinates; an area needs 3")
        regions.append(Region(name, element.get("PartOfGroup") or "", kind, points))
    return regions


def rasterize_regions(
    regions: list[Region],
    dimensions: tuple[int, int],
    downsample: float,
    exclusion_groups: tuple[str, ...] = EXCLUSION_GROUPS,
) -> np.ndarray:
    """Bool tumour mask ``[ceil(H / downsample), ceil(W / downsample)]`` for a slide of level-0 ``dimensions``
    (W, H): tumour regions filled, then regions of ``exclusion_groups`` cleared. A mask pixel is tumour when its
    centre lies inside a polygon (scikit-image's rule)."""
    from skimage.draw import polygon

    if downsample <= 0:
        raise ValueError(f"downsample must be > 0 (level-0 px per mask px), got {downsample}")
    width, height = int(dimensions[0]), int(dimensions[1])
    shape = (math.ceil(height / downsample), math.ceil(width / downsample))
    mask = np.zeros(shape, dtype=bool)
    # pixel (r, c) covers level-0 [c*d, (c+1)*d): its centre is at (c + 0.5) * d, so shift by half a pixel
    for clear in (False, True):
        for region in regions:
            if (region.group in exclusion_groups) != clear:
                continue
            cols = region.points[:, 0] / downsample - 0.5
            rows = region.points[:, 1] / downsample - 0.5
            rr, cc = polygon(rows, cols, shape=shape)
            mask[rr, cc] = not clear
    return mask


def write_annotation_mask(
    xml_path: str | os.PathLike | None,
    dimensions: tuple[int, int],
    out_path: str | os.PathLike,
    downsample: float = 32.0,
    exclusion_groups: tuple[str, ...] = EXCLUSION_GROUPS,
) -> tuple[Path, int]:
    """Rasterise ``xml_path`` (None: no annotation, an empty mask) for a slide of level-0 ``dimensions`` and write
    a 0 / ``TUMOUR_LABEL`` label-map PNG atomically. Returns (path, number of tumour mask pixels)."""
    from PIL import Image

    regions = read_asap_xml(xml_path) if xml_path is not None else []
    mask = rasterize_regions(regions, dimensions, downsample, exclusion_groups)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(mask.astype(np.uint8) * TUMOUR_LABEL).save(tmp, format="PNG")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path, int(mask.sum())
