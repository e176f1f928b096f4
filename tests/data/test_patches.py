"""Patch reading: single patches, worker-safe dataset, block-read patch banks (cached), corrupt tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milstudy.data.patches import PatchDataset, collate_patches, extract_patch_bank, read_patch, resize_patches
from milstudy.data.slides import open_slide
from milstudy.data.tiling import tile_slide
from milstudy.paths import cache_root


def test_read_patch_matches_source(tiny_slide, rendered):
    slide = open_slide(tiny_slide)
    grid = tile_slide(slide, 0.5, 32, min_tissue=0.5)  # native level, no resampling
    x, y = grid.coords[3]
    np.testing.assert_array_equal(read_patch(slide, grid, 3), rendered[0][y : y + 32, x : x + 32])


def test_resize_box_average():
    patches = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = resize_patches(patches, 2)
    assert out.shape == (2, 2, 2, 3)
    assert out[0, 0, 0, 0] == np.rint(patches[0, :2, :2, 0].mean())


@pytest.mark.parametrize("mpp,size", [(2.0, 16), (1.0, 24), (4.0, 16)])
def test_patch_bank_equals_patch_by_patch_reads(tiny_slide, mpp, size):
    slide = open_slide(tiny_slide)
    grid = tile_slide(slide, mpp, size, min_tissue=0.3)
    bank = extract_patch_bank(tiny_slide, grid, cache=False, block=96)
    assert bank.shape == (len(grid), size, size, 3) and bank.dtype == np.uint8
    expected = np.stack([read_patch(slide, grid, i) for i in range(len(grid))])
    np.testing.assert_array_equal(bank, expected)


def test_patch_bank_is_cached_atomically(tiny_slide):
    grid = tile_slide(open_slide(tiny_slide), 2.0, 16)
    first = extract_patch_bank(tiny_slide, grid)
    files = list((cache_root() / "patches").glob("*.npy"))
    assert files and not list((cache_root() / "patches").glob(".*tmp"))
    np.testing.assert_array_equal(extract_patch_bank(tiny_slide, grid), first)


def test_dataset_in_two_worker_processes(tiny_slide):
    slide = open_slide(tiny_slide)
    grid = tile_slide(slide, 2.0, 16)
    dataset = PatchDataset(tiny_slide, grid)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate_patches)
    batches = list(loader)
    images = torch.cat([b["images"] for b in batches])
    indices = torch.cat([b["indices"] for b in batches])
    assert images.shape == (len(grid), 3, 16, 16) and images.dtype == torch.uint8
    bank = extract_patch_bank(tiny_slide, grid, cache=False)
    expected = torch.from_numpy(bank[indices.numpy()]).permute(0, 3, 1, 2)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


def test_corrupt_tiles_are_skipped_and_counted(corrupt_tile_slide):
    path, image, (x0, y0, x1, y1) = corrupt_tile_slide
    slide = open_slide(path)
    grid = tile_slide(slide, 0.5, 64, min_tissue=0.0)
    in_bad = (grid.coords[:, 0] >= x0) & (grid.coords[:, 1] >= y0)
    assert in_bad.sum() == 4 and len(grid) == 64
    dataset = PatchDataset(path, grid)
    batch = collate_patches([dataset[i] for i in range(len(grid))])
    assert batch["n_failed"] == 4
    assert len(batch["indices"]) == 60 and not in_bad[batch["indices"].numpy()].any()
    assert sorted(dataset.failed) == sorted(np.flatnonzero(in_bad).tolist())
    with pytest.warns(UserWarning, match="4 of 64 patches"):
        bank, valid = extract_patch_bank(path, grid, cache=False, return_valid=True)
    np.testing.assert_array_equal(~valid, in_bad)
    good = np.flatnonzero(valid)
    for i in good[:5]:
        x, y = grid.coords[i]
        np.testing.assert_array_equal(bank[i], image[y : y + 64, x : x + 64])
