"""Reading the patches of a :class:`~milstudy.data.tiling.PatchGrid`: one at a time, as a worker-safe torch
Dataset, or all at once as an in-memory "patch bank" cached on disk.

* :func:`read_patch` reads one patch (``read_size`` px at the grid's level) and resizes it to ``patch_size``.
* :class:`PatchDataset` opens one OpenSlide handle per DataLoader worker process, lazily. A region OpenSlide
  cannot decode is skipped: the item comes back with ``ok=False`` (zero image) and :func:`collate_patches`
  drops it and counts it, so a slide with a few corrupt tiles goes on.
* :func:`extract_patch_bank` reads big blocks of the grid's level (the whole level when it is small) and slices
  patches in numpy instead of one ``read_region`` per patch; the uint8 ``[N, p, p, 3]`` bank is cached under
  ``cache_root()/patches/`` keyed by the file identity (path, size, mtime) and the grid, written atomically.
  The end-to-end trainer trains from these banks on CPU (main + low scale).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from milstudy.data.slides import CorruptRegionError, Slide, open_slide
from milstudy.data.tiling import PatchGrid

__all__ = ["PatchDataset", "collate_patches", "extract_patch_bank", "read_patch", "resize_patches"]


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[N, s, s, 3]`` (or ``[s, s, 3]``) to ``size`` px: box average for integer reductions,
    bilinear (PIL) otherwise."""
    single = patches.ndim == 3
    batch = patches[None] if single else patches
    src = batch.shape[1]
    if src == size:
        out = batch
    elif src % size == 0:
        k = src // size
        view = batch.reshape(batch.shape[0], size, k, size, k, 3).astype(np.float32)
        out = np.rint(view.mean(axis=(2, 4))).astype(np.uint8)
    else:
        from PIL import Image

        out = np.stack(
            [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR)) for p in batch]
        )
    return out[0] if single else out


def read_patch(slide: Slide, grid: PatchGrid, index: int) -> np.ndarray:
    """Patch ``index`` of ``grid`` as uint8 ``[patch_size, patch_size, 3]``; raises CorruptRegionError."""
    x, y = grid.coords[index]
    region = slide.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size))
    return resize_patches(region, grid.patch_size)


class PatchDataset:
    """Torch-style dataset over one slide's grid; item ``i`` -> ``(image, i, ok)``.

    ``image`` is ``transform(uint8 [p, p, 3])`` if a transform is given, else a uint8 tensor ``[3, p, p]``:
    workers and the host-to-device copy move a quarter of the bytes of float32, and the consumer converts on its
    device (``PatchEncoder`` accepts uint8 and divides by 255 itself). The slide is opened lazily in each process
    (pickling drops the handle). ``ok`` is False for a region OpenSlide could not decode (the image is then
    zeros); use :func:`collate_patches` to drop those.
    """

    def __init__(self, slide_path: str | os.PathLike | Slide, grid: PatchGrid, transform=None, mpp: float | None = None):
        self.slide = slide_path if isinstance(slide_path, Slide) else open_slide(slide_path, mpp=mpp or grid.slide_mpp or None)
        self.grid = grid
        self.transform = transform
        self.failed: list[int] = []  # indices that failed in this process

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int):
        import torch

        ok = True
        try:
            patch = read_patch(self.slide, self.grid, int(index))
        except CorruptRegionError:
            ok = False
            self.failed.append(int(index))
            patch = np.zeros((self.grid.patch_size, self.grid.patch_size, 3), np.uint8)
        if self.transform is not None:
            image = self.transform(patch)
        else:
            image = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))
        return image, int(index), ok


def collate_patches(items: list) -> dict:
    """Stack ``(image, index, ok)`` items, dropping failed ones: ``{"images", "indices", "n_failed"}``."""
    import torch

    good = [it for it in items if it[2]]
    if good:
        images = torch.stack([torch.as_tensor(it[0]) for it in good])
    else:
        images = torch.zeros((0,) + tuple(torch.as_tensor(items[0][0]).shape)) if items else torch.zeros(0)
    return {
        "images": images,
        "indices": torch.tensor([it[1] for it in good], dtype=torch.long),
        "n_failed": len(items) - len(good),
    }


# -------------------------------------------------------------------------------------------------------------
# Patch banks
# -------------------------------------------------------------------------------------------------------------


def _bank_key(slide_path: Path, grid: PatchGrid) -> str:
    stat = slide_path.stat()
    h = hashlib.sha1()
    h.update(json.dumps([str(slide_path.resolve()), stat.st_size, stat.st_mtime_ns]).encode())
    h.update(json.dumps([grid.level, grid.read_size, grid.patch_size, grid.size_level0]).encode())
    h.update(np.ascontiguousarray(grid.coords, np.int64).tobytes())
    return h.hexdigest()[:24]


def extract_patch_bank(
    slide_path: str | os.PathLike,
    grid: PatchGrid,
    *,
    cache: bool = True,
    block: int = 2048,
    mpp: float | None = None,
    return_valid: bool = False,
    progress: bool = False,
):
    """All patches of ``grid`` as uint8 ``[N, p, p, 3]`` (and bool ``valid[N]`` if ``return_valid``).

    Reads blocks of about ``block`` x ``block`` px at the grid's level and slices them; a block OpenSlide
    cannot decode is retried patch by patch, and patches that still fail are white and ``valid=False``
    (counted in a warning). Cached under ``cache_root()/patches/<key>.npy`` when ``cache``.
    """
    from milstudy.paths import cache_root

    slide_path = Path(slide_path)
    if not slide_path.exists():
        raise FileNotFoundError(f"{slide_path}: slide file not found")
    p, n = grid.patch_size, len(grid)
    cache_file = cache_root() / "patches" / f"{_bank_key(slide_path, grid)}.npy" if cache else None
    valid_file = cache_file.with_suffix(".valid.npy") if cache_file is not None else None
    if cache_file is not None and cache_file.exists() and valid_file.exists():
        bank, valid = np.load(cache_file), np.load(valid_file)
        return (bank, valid) if return_valid else bank

    bank = np.full((n, p, p, 3), 255, np.uint8)
    valid = np.ones(n, bool)
    if n:
        slide = open_slide(slide_path, mpp=mpp or grid.slide_mpp or None)
        ds = slide.level_downsamples[grid.level]
        lw, lh = slide.level_dimensions[grid.level]
        rs = grid.read_size
        lx = np.floor(grid.coords[:, 0] / ds).astype(np.int64)
        ly = np.floor(grid.coords[:, 1] / ds).astype(np.int64)
        bx, by = lx // block, ly // block
        order = np.lexsort((bx, by))
        groups = np.split(order, np.flatnonzero(np.diff(by[order] * (lw // block + 2) + bx[order])) + 1)
        iterator = groups
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(groups, desc=f"patches {slide_path.name}", unit="block")
        for members in iterator:
            x0, y0 = int(lx[members].min()), int(ly[members].min())
            x1, y1 = int(lx[members].max()) + rs, int(ly[members].max()) + rs
            if len(members) * rs * rs < 0.3 * (x1 - x0) * (y1 - y0):
                region = None  # sparse patches: a block read would decode mostly unused pixels
            else:
                try:
                    region = slide.read_region((int(round(x0 * ds)), int(round(y0 * ds))), grid.level, (x1 - x0, y1 - y0))
                except CorruptRegionError:
                    region = None
            if region is not None:
                crops = np.stack([region[ly[i] - y0 : ly[i] - y0 + rs, lx[i] - x0 : lx[i] - x0 + rs] for i in members])
                bank[members] = resize_patches(crops, p)
                continue
            for i in members:  # sparse, or the block failed: patch by patch
                try:
                    bank[i] = read_patch(slide, grid, int(i))
                except CorruptRegionError:
                    valid[i] = False
        slide.close()
    if not valid.all():
        warnings.warn(
            f"{slide_path}: {int((~valid).sum())} of {n} patches could not be decoded (corrupt tiles); "
            f"they are white and marked invalid",
            stacklevel=2,
        )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        for target, array in ((valid_file, valid), (cache_file, bank)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, array)
            os.replace(tmp, target)
    return (bank, valid) if return_valid else bank
