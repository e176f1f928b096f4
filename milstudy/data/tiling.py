"""Patch grids: where to cut a slide into patches at a physical resolution, single- and multi-scale.

:func:`tile_slide` lays a regular grid of square patches (level-0 top-left coordinates, row-major order) over a
slide at a target resolution in µm/px (10x ≈ 1.0, 20x ≈ 0.5), keeps patches whose tissue fraction (from a
:class:`~milstudy.data.tissue.TissueMask`, via an integral image) reaches ``min_tissue``, and records the pyramid
level to read (the lowest-resolution level at least as fine as the target) and the read size at that level
(resampled to ``patch_size`` by the readers in :mod:`milstudy.data.patches`).

:func:`multiscale_grid` builds the two scales of multi-scale random instance sampling (MRIS, specs/abmilx.md
§2.2): main-scale patches, plus low-magnification patches covering ``low_factor`` times the field of view,
resized to the same pixel size. Geometry (documented choice): both grids start at the slide origin and the low
grid's step is ``low_factor`` times the main step, so every low patch covers exactly a ``low_factor`` x
``low_factor`` block of main-grid cells; ``main_to_low[i]`` is the low patch containing main patch ``i``
(-1 if that low patch has too little tissue). The two scales are sampled independently (as upstream).

An empty grid (no tissue) is a valid result. Grids save to / load from HDF5 (``coords`` dataset + attributes).

:func:`cached_multiscale_grid` memoises :func:`multiscale_grid` (tissue segmentation + tiling take seconds per
slide) in ``cache_root()/grids/<key>.h5``, keyed by the slide file's identity (resolved path, size, mtime) and every
grid parameter; files are written atomically and an unreadable cache file is rebuilt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from milstudy.data.slides import Slide, open_slide
from milstudy.data.tissue import TissueMask, segment_tissue

__all__ = [
    "MultiScaleGrid",
    "PatchGrid",
    "cached_multiscale_grid",
    "load_grid",
    "mask_fraction",
    "multiscale_grid",
    "save_grid",
    "tile_slide",
]


@dataclass
class PatchGrid:
    """Square patches of one slide at one scale.

    ``coords``: int64 ``[N, 2]`` (x, y) level-0 top-left; each patch covers ``size_level0`` level-0 px, is read as
    ``read_size`` px at ``level`` and resized to ``patch_size`` px (at ``target_mpp`` µm/px).
    """

    coords: np.ndarray
    patch_size: int
    level: int
    read_size: int
    size_level0: int
    target_mpp: float
    tissue_fraction: np.ndarray
    slide_path: str = ""
    slide_id: str = ""
    step_level0: int = 0
    min_tissue: float = 0.5
    slide_mpp: float = 0.0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def mpp(self) -> float:
        """µm per output pixel (alias of ``target_mpp``)."""
        return self.target_mpp

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    def subset(self, index: np.ndarray) -> "PatchGrid":
        """A grid with only the patches at ``index`` (boolean mask or integer indices)."""
        return replace(self, coords=self.coords[index], tissue_fraction=self.tissue_fraction[index])

    def attrs(self) -> dict:
        return {
            "patch_size": self.patch_size,
            "level": self.level,
            "read_size": self.read_size,
            "size_level0": self.size_level0,
            "target_mpp": self.target_mpp,
            "slide_path": self.slide_path,
            "slide_id": self.slide_id,
            "step_level0": self.step_level0,
            "min_tissue": self.min_tissue,
            "slide_mpp": self.slide_mpp,
        }


@dataclass
class MultiScaleGrid:
    """Main-scale and low-scale grids of one slide (MRIS); ``main_to_low`` int64 ``[N_main]`` (-1: none)."""

    main: PatchGrid
    low: PatchGrid
    main_to_low: np.ndarray
    low_factor: int = 2


def _integral(mask: np.ndarray) -> np.ndarray:
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1, out=integral[1:, 1:])
    return integral


def mask_fraction(
    mask: np.ndarray, coords: np.ndarray, size_level0: float, downsample: tuple[float, float] | float
) -> np.ndarray:
    """Fraction of each square ``[x, x+size) x [y, y+size)`` (level-0) that is True in ``mask`` ``[h, w]``.

    ``downsample`` = level-0 px per mask px (x, y). Box edges are rounded to the nearest mask pixel (exact when
    patch sizes are multiples of the downsample); vectorised with an integral image. Returns float32 ``[N]``.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if coords.shape[0] == 0:
        return np.zeros(0, np.float32)
    dsx, dsy = (downsample, downsample) if np.isscalar(downsample) else downsample
    h, w = mask.shape
    integral = _integral(mask.astype(bool))
    x0 = np.clip(np.rint(coords[:, 0] / dsx), 0, w).astype(np.int64)
    x1 = np.clip(np.rint((coords[:, 0] + size_level0) / dsx), 0, w).astype(np.int64)
    y0 = np.clip(np.rint(coords[:, 1] / dsy), 0, h).astype(np.int64)
    y1 = np.clip(np.rint((coords[:, 1] + size_level0) / dsy), 0, h).astype(np.int64)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    # Normalise by the full nominal patch area so that parts outside the mask count as background.
    area = max(size_level0 / dsx, 1e-9) * max(size_level0 / dsy, 1e-9)
    return np.clip(inside / area, 0.0, 1.0).astype(np.float32)


def _geometry(slide: Slide, target_mpp: float, patch_size: int) -> tuple[int, int, int]:
    """(level, read_size at that level, size in level-0 px) for ``patch_size`` px at ``target_mpp``."""
    if patch_size <= 0:
        raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
    level = slide.best_level_for_mpp(target_mpp)
    size_level0 = int(round(patch_size * target_mpp / slide.mpp))
    read_size = max(1, int(round(size_level0 / slide.level_downsamples[level])))
    if size_level0 < 1:
        raise ValueError(f"{slide.path}: patch of {patch_size} px at {target_mpp} µm/px is below one level-0 pixel")
    return level, read_size, size_level0


def tile_slide(
    slide: Slide | str | os.PathLike,
    target_mpp: float,
    patch_size: int,
    step: int | None = None,
    min_tissue: float = 0.5,
    mask: TissueMask | None = None,
    *,
    origin: tuple[int, int] = (0, 0),
    slide_id: str | None = None,
) -> PatchGrid:
    """Grid of tissue patches of ``patch_size`` px at ``target_mpp`` µm/px; ``step`` in output px (default: no overlap).

    Coordinates are level-0 top-left, row-major (y, then x), deterministic. ``mask`` defaults to
    :func:`segment_tissue` on the slide. Returns a possibly empty :class:`PatchGrid`.
    """
    if not isinstance(slide, Slide):
        slide = open_slide(slide)
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    level, read_size, size_level0 = _geometry(slide, target_mpp, patch_size)
    step_px = patch_size if step is None else int(step)
    if step_px <= 0:
        raise ValueError(f"step must be a positive number of output pixels, got {step}")
    step_level0 = max(1, int(round(step_px * target_mpp / slide.mpp)))
    if mask is None:
        mask = segment_tissue(slide)
    width, height = slide.dimensions
    xs = np.arange(origin[0], width - size_level0 + 1, step_level0, dtype=np.int64)
    ys = np.arange(origin[1], height - size_level0 + 1, step_level0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    candidates = np.stack([gx.ravel(), gy.ravel()], axis=1)
    fraction = mask_fraction(mask.mask, candidates, size_level0, mask.downsample)
    keep = fraction >= min_tissue if min_tissue > 0 else np.ones(len(fraction), bool)
    return PatchGrid(
        coords=candidates[keep],
        patch_size=int(patch_size),
        level=level,
        read_size=read_size,
        size_level0=size_level0,
        target_mpp=float(target_mpp),
        tissue_fraction=fraction[keep],
        slide_path=str(slide.path),
        slide_id=slide_id or slide.slide_id,
        step_level0=step_level0,
        min_tissue=float(min_tissue),
        slide_mpp=slide.mpp,
        extra={"mask_params": {k: v for k, v in mask.params.items() if v is not None}},
    )


def multiscale_grid(
    slide: Slide | str | os.PathLike,
    main_mpp: float,
    patch_size: int,
    low_factor: int = 2,
    min_tissue: float = 0.5,
    mask: TissueMask | None = None,
    *,
    slide_id: str | None = None,
) -> MultiScaleGrid:
    """Main-scale grid at ``main_mpp`` plus a low-magnification grid at ``low_factor * main_mpp`` (same pixels).

    See the module docstring for the geometry. Both grids may be empty.
    """
    if not isinstance(slide, Slide):
        slide = open_slide(slide)
    if int(low_factor) != low_factor or low_factor < 1:
        raise ValueError(f"low_factor must be a positive integer, got {low_factor}")
    low_factor = int(low_factor)
    if mask is None:
        mask = segment_tissue(slide)
    main = tile_slide(slide, main_mpp, patch_size, None, min_tissue, mask, slide_id=slide_id)
    low = tile_slide(slide, main_mpp * low_factor, patch_size, None, min_tissue, mask, slide_id=slide_id)
    low_step = low.step_level0
    width, height = slide.dimensions
    n_cols = (width - low.size_level0) // low_step + 1 if width >= low.size_level0 else 0
    n_rows = (height - low.size_level0) // low_step + 1 if height >= low.size_level0 else 0
    cell_to_low = np.full(max(n_cols * n_rows, 1), -1, np.int64)
    cell_to_low[(low.coords[:, 1] // low_step) * n_cols + low.coords[:, 0] // low_step] = np.arange(len(low))
    cols, rows = main.coords[:, 0] // low_step, main.coords[:, 1] // low_step
    valid = (cols < n_cols) & (rows < n_rows)
    main_to_low = np.full(len(main), -1, np.int64)
    main_to_low[valid] = cell_to_low[rows[valid] * n_cols + cols[valid]]
    return MultiScaleGrid(main=main, low=low, main_to_low=main_to_low, low_factor=low_factor)


GRID_CACHE_VERSION = 1


def _grid_cache_key(path: Path, params: dict) -> str:
    import hashlib
    import json

    stat = path.stat()
    payload = [GRID_CACHE_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, params]
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cached_multiscale_grid(
    slide_path: str | os.PathLike,
    main_mpp: float,
    patch_size: int,
    low_factor: int = 2,
    min_tissue: float = 0.5,
    *,
    slide_id: str | None = None,
    cache: bool = True,
) -> MultiScaleGrid:
    """:func:`multiscale_grid` of the slide file ``slide_path`` (default tissue mask), cached on disk.

    The cache file ``cache_root()/grids/<key>.h5`` holds groups ``main`` and ``low`` (as :func:`save_grid`) plus
    ``main_to_low``; the key covers the file identity (resolved path, size, mtime) and all arguments, so a changed
    slide or parameter misses. A cache file that cannot be read is rebuilt. ``cache=False`` always recomputes.
    """
    from milstudy.paths import cache_root

    path = Path(slide_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: slide file not found")
    if not cache:
        return multiscale_grid(path, main_mpp, patch_size, low_factor, min_tissue, slide_id=slide_id)
    params = {"main_mpp": float(main_mpp), "patch_size": int(patch_size), "low_factor": int(low_factor),
              "min_tissue": float(min_tissue), "slide_id": slide_id or ""}
    cache_file = cache_root() / "grids" / f"{_grid_cache_key(path, params)}.h5"
    if cache_file.exists():
        try:
            return _load_multiscale(cache_file)
        except Exception:  # noqa: BLE001 - truncated / corrupt cache file: rebuild it below
            pass
    grids = multiscale_grid(path, main_mpp, patch_size, low_factor, min_tissue, slide_id=slide_id)
    _save_multiscale(cache_file, grids)
    return grids


def _save_multiscale(path: Path, grids: MultiScaleGrid) -> None:
    from milstudy.provenance import atomic_write_h5

    def fill(f) -> None:
        _write_group(f.create_group("main"), grids.main, {})
        _write_group(f.create_group("low"), grids.low, {})
        f.create_dataset("main_to_low", data=np.asarray(grids.main_to_low, np.int64))
        f.attrs["low_factor"] = grids.low_factor
        f.attrs["mask_params"] = json.dumps(grids.main.extra.get("mask_params", {}), default=str)

    atomic_write_h5(path, fill)


def _load_multiscale(path: Path) -> MultiScaleGrid:
    import h5py

    main, low = load_grid(path, "main"), load_grid(path, "low")
    with h5py.File(path, "r") as f:
        main_to_low = f["main_to_low"][()].astype(np.int64)
        low_factor = int(f.attrs["low_factor"])
        mask_params = json.loads(f.attrs["mask_params"])
    if len(main_to_low) != len(main):
        raise ValueError(f"{path}: main_to_low has {len(main_to_low)} entries for {len(main)} main patches")
    for grid in (main, low):
        grid.extra = {"mask_params": mask_params}
    return MultiScaleGrid(main=main, low=low, main_to_low=main_to_low, low_factor=low_factor)


def save_grid(path: str | os.PathLike, grid: PatchGrid, datasets: dict | None = None, low: PatchGrid | None = None) -> Path:
    """Write ``grid`` to HDF5 (``coords``, ``tissue_fraction`` + attributes; ``datasets`` adds e.g. instance
    labels; ``low`` goes to group ``low/``). Atomic (:func:`milstudy.provenance.atomic_write_h5`): a full disk is
    one ``OSError(ENOSPC)`` naming ``path``."""
    from milstudy.provenance import atomic_write_h5

    def fill(f) -> None:
        _write_group(f, grid, datasets or {})
        if low is not None:
            _write_group(f.create_group("low"), low, {})

    return atomic_write_h5(Path(path), fill)


def coords_attributes(size_level0: int, patch_size: int, target_mpp: float) -> dict:
    """Attributes written on every ``coords`` dataset we save, so that TRIDENT's readers (and its slide encoders,
    which look for ``patch_size_level0`` there) and ours find the patch size: TRIDENT ``patch_size_level0`` /
    ``patch_size``, ours ``size_level0`` / ``target_mpp`` (also on the file root)."""
    return {"patch_size_level0": int(size_level0), "patch_size": int(patch_size), "size_level0": int(size_level0),
            "target_mpp": float(target_mpp)}


def _write_group(group, grid: PatchGrid, datasets: dict) -> None:
    coords = group.create_dataset("coords", data=np.asarray(grid.coords, np.int64).reshape(-1, 2))
    for key, value in coords_attributes(grid.size_level0, grid.patch_size, grid.target_mpp).items():
        coords.attrs[key] = value
    group.create_dataset("tissue_fraction", data=np.asarray(grid.tissue_fraction, np.float32))
    for name, value in datasets.items():
        group.create_dataset(name, data=np.asarray(value))
    for key, value in grid.attrs().items():
        group.attrs[key] = value


def load_grid(path: str | os.PathLike, group: str | None = None) -> PatchGrid:
    """Read a grid written by :func:`save_grid` (``group="low"`` for the low scale); extra datasets land in
    ``grid.extra``."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: grid file not found; create it with `milstudy data tile`")
    with h5py.File(path, "r") as f:
        g = f[group] if group else f
        if "coords" not in g:
            raise ValueError(f"{path}: no 'coords' dataset{' in group ' + group if group else ''}")
        attrs = dict(g.attrs)
        extra = {k: g[k][()] for k in g.keys() if k not in ("coords", "tissue_fraction") and not hasattr(g[k], "keys")}
        coords = g["coords"][()].astype(np.int64).reshape(-1, 2)
        fraction = g["tissue_fraction"][()] if "tissue_fraction" in g else np.ones(len(coords), np.float32)
    str_attr = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    return PatchGrid(
        coords=coords,
        patch_size=int(attrs["patch_size"]),
        level=int(attrs["level"]),
        read_size=int(attrs["read_size"]),
        size_level0=int(attrs["size_level0"]),
        target_mpp=float(attrs["target_mpp"]),
        tissue_fraction=np.asarray(fraction, np.float32),
        slide_path=str_attr(attrs.get("slide_path", "")),
        slide_id=str_attr(attrs.get("slide_id", "")),
        step_level0=int(attrs.get("step_level0", 0)),
        min_tissue=float(attrs.get("min_tissue", 0.5)),
        slide_mpp=float(attrs.get("slide_mpp", 0.0)),
        extra=extra,
    )
