"""Patch coordinates written by other tools, reused for our extraction (issue 14): CLAM ``patches/<slide>.h5``,
TRIDENT ``patches/<slide>_patches.h5`` and our own grids / bags.

All three store level-0 top-left ``coords`` ``[N, 2]``; they differ in how they say how large a patch is:

- TRIDENT (``trident/wsi_objects/WSI.py`` ``extract_tissue_coords``): attributes on the ``coords`` dataset,
  ``patch_size_level0`` (level-0 px), ``patch_size`` (px at ``target_magnification``), ``level0_magnification``;
- CLAM (``wsi_core/WholeSlideImage.py`` ``process_contour`` / ``save_hdf5``): attributes on ``coords``,
  ``patch_level`` and ``patch_size`` (px read at that level), ``downsample`` (the level's downsample, newer CLAM);
- milstudy (``save_grid`` / ``features extract``): ``size_level0`` on the file root and, since issue 14, on
  ``coords`` as well, beside TRIDENT's and CLAM's names (so their readers find them).

``grid_from_coords(path, slide, target_mpp, patch_size)`` turns such a file into a :class:`PatchGrid` for this
slide, refusing one whose patches do not cover what ``target_mpp`` x ``patch_size`` covers on the slide.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from milstudy.data.tiling import PatchGrid, _geometry, coords_attributes  # noqa: F401 (coords_attributes: API)


def coords_file(coords_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """The coordinate file of ``slide_id`` in ``coords_dir`` (or its ``patches/`` folder): TRIDENT's
    ``<slide_id>_patches.h5`` or CLAM's / ours ``<slide_id>.h5``; None if there is none."""
    root = Path(coords_dir)
    for folder in (root, root / "patches"):
        for name in (f"{slide_id}_patches.h5", f"{slide_id}.h5"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_coords(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """``coords`` int64 ``[N, 2]`` and the attributes of the file root and of ``coords`` (coords' win)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            if "coords" not in handle:
                raise ValueError(f"{path}: no 'coords' dataset (keys: {sorted(handle.keys())}); expected CLAM, "
                                 "TRIDENT or milstudy patch coordinates")
            attrs = {**dict(handle.attrs), **dict(handle["coords"].attrs)}
            coords = np.asarray(handle["coords"][()])
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None
    if coords.size == 0:
        return np.zeros((0, 2), np.int64), attrs
    coords = coords.reshape(-1, coords.shape[-1])
    if coords.shape[1] != 2:
        raise ValueError(f"{path}: 'coords' has shape {coords.shape}, expected [N, 2] level-0 (x, y)")
    return coords.astype(np.int64), attrs


def patch_size_level0(attrs: dict, level_downsamples=None, where: str = "") -> int:
    """The patch side in level-0 px from a coordinate file's attributes (TRIDENT, milstudy or CLAM names)."""
    for key in ("patch_size_level0", "size_level0"):
        if key in attrs:
            return int(round(float(attrs[key])))
    if "patch_size" in attrs and "patch_level" in attrs:
        level = int(attrs["patch_level"])
        if "downsample" in attrs:
            factor = float(np.ravel(attrs["downsample"])[0])
        elif level_downsamples is not None and level < len(level_downsamples):
            factor = float(level_downsamples[level])
        else:
            raise ValueError(f"{where}: CLAM coordinates at patch_level {level} without 'downsample'; the slide has "
                             f"no such level")
        return int(round(float(attrs["patch_size"]) * factor))
    raise ValueError(f"{where}: the patch size is not recorded (no patch_size_level0 / size_level0 / CLAM "
                     f"patch_size + patch_level attribute; found {sorted(attrs)})")


def grid_from_coords(path: str | os.PathLike, slide, target_mpp: float, patch_size: int,
                     slide_id: str | None = None, tolerance: int = 1) -> PatchGrid:
    """A :class:`PatchGrid` of ``slide`` at the coordinates of ``path`` (read at the slide level our tiling would
    use, resized to ``patch_size``). The file's patch footprint must equal ``patch_size * target_mpp /
    slide.mpp`` level-0 px (within ``tolerance``); otherwise a ValueError says what each side covers."""
    coords, attrs = read_coords(path)
    level, read_size, expected = _geometry(slide, target_mpp, patch_size)
    size0 = patch_size_level0(attrs, getattr(slide, "level_downsamples", None), str(path)) if len(coords) else expected
    if abs(size0 - expected) > tolerance:
        raise ValueError(
            f"{path}: its patches cover {size0} level-0 px, but {patch_size} px at {target_mpp} µm/px cover "
            f"{expected} level-0 px of slide {slide_id or slide.slide_id} ({slide.mpp:.4g} µm/px); pass the --mpp "
            f"and --patch-size the coordinates were made for (e.g. --mpp {size0 * slide.mpp / patch_size:.4g})")
    return PatchGrid(coords=coords, patch_size=int(patch_size), level=level, read_size=read_size,
                     size_level0=expected, target_mpp=float(target_mpp),
                     tissue_fraction=np.ones(len(coords), np.float32), slide_path=str(slide.path),
                     slide_id=slide_id or slide.slide_id, min_tissue=float("nan"), slide_mpp=slide.mpp,
                     extra={"coords_file": str(path)})
