"""Tissue masks and patch grids: real tissue, grids inside tissue, multi-scale geometry, empty slides, HDF5."""

from __future__ import annotations

import numpy as np
import pytest

from milstudy.data.realtissue import real_tissue_slide
from milstudy.data.slides import open_slide
from milstudy.data import tiling
from milstudy.data.tiling import (
    cached_multiscale_grid,
    load_grid,
    mask_fraction,
    multiscale_grid,
    save_grid,
    tile_slide,
)
from milstudy.data.tissue import segment_tissue


@pytest.fixture(scope="module")
def real_slide():
    return open_slide(real_tissue_slide())


def test_real_tissue_slide_reads_through_openslide(real_slide):
    assert real_slide.properties["openslide.vendor"] == "generic-tiff"
    assert real_slide.dimensions == (2048, 2048) and real_slide.level_count >= 3
    assert real_slide.mpp == pytest.approx(0.25)


def test_tissue_mask_on_real_tissue_is_sane(real_slide):
    mask = segment_tissue(real_slide)
    assert 0.2 < mask.tissue_fraction < 0.9
    assert mask.downsample[0] == pytest.approx(2048 / mask.mask.shape[1])
    assert {"threshold", "closing_px", "min_area_px", "max_hole_px"} <= set(mask.params)
    grid = tile_slide(real_slide, 0.5, 32, mask=mask)
    assert 200 <= len(grid) <= 1500


def test_tissue_mask_separates_rendered_tissue(tiny_slide, rendered):
    slide = open_slide(tiny_slide)
    mask = segment_tissue(slide, min_mask_mpp=4.0)  # 8 level-0 px per mask px, like the label map
    truth = rendered[1] >= 1
    assert mask.mask.shape == truth.shape
    assert (mask.mask == truth).mean() > 0.9


def _brute_fraction(mask, x, y, size, ds):
    return mask[int(round(y / ds)) : int(round((y + size) / ds)), int(round(x / ds)) : int(round((x + size) / ds))].sum() / (size / ds) ** 2


def test_mask_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(40, 50)) > 0.6
    coords = rng.integers(0, 300, size=(30, 2)) // 8 * 8
    fast = mask_fraction(mask, coords, 32, 8)
    slow = [_brute_fraction(mask, x, y, 32, 8) for x, y in coords]
    np.testing.assert_allclose(fast, slow, rtol=1e-6)


def test_grid_is_inside_tissue_row_major_and_in_bounds(tiny_slide):
    slide = open_slide(tiny_slide)
    mask = segment_tissue(slide)
    grid = tile_slide(slide, 2.0, 16, min_tissue=0.6, mask=mask)
    assert len(grid) > 10
    assert grid.level == 2 and grid.read_size == 16 and grid.size_level0 == 64
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    assert (x >= 0).all() and (y >= 0).all()
    assert (x + 64 <= 1024).all() and (y + 64 <= 768).all()
    assert (x % 64 == 0).all() and (y % 64 == 0).all()
    keys = y * 10_000 + x
    assert (np.diff(keys) > 0).all()  # row-major, deterministic
    dsx = mask.downsample[0]
    brute = np.array([_brute_fraction(mask.mask, a, b, 64, dsx) for a, b in grid.coords])
    assert (brute >= 0.6 - 1e-6).all()
    np.testing.assert_allclose(grid.tissue_fraction, brute, atol=1e-5)
    assert grid.mpp == 2.0


def test_no_tissue_gives_empty_grid(blank_slide, tmp_path):
    slide = open_slide(blank_slide)
    mask = segment_tissue(slide)
    assert mask.is_empty
    grid = tile_slide(slide, 1.0, 32, mask=mask)
    assert grid.is_empty and grid.coords.shape == (0, 2)
    ms = multiscale_grid(slide, 1.0, 32, mask=mask)
    assert len(ms.main) == 0 and len(ms.low) == 0
    back = load_grid(save_grid(tmp_path / "empty.h5", grid))
    assert back.is_empty


def test_multiscale_geometry(tiny_slide):
    slide = open_slide(tiny_slide)
    ms = multiscale_grid(slide, 1.0, 32, low_factor=2, min_tissue=0.3)
    main, low = ms.main, ms.low
    assert low.patch_size == main.patch_size == 32
    assert low.size_level0 == 2 * main.size_level0  # 2x field of view, same pixels
    assert low.target_mpp == pytest.approx(2 * main.target_mpp)
    assert (low.coords % low.size_level0 == 0).all()  # low grid aligned on the slide origin
    linked = ms.main_to_low >= 0
    assert linked.mean() > 0.8
    parent = low.coords[ms.main_to_low[linked]]
    child = main.coords[linked]
    assert (child >= parent).all() and (child + main.size_level0 <= parent + low.size_level0).all()


def test_grid_hdf5_roundtrip(tiny_slide, tmp_path):
    slide = open_slide(tiny_slide)
    ms = multiscale_grid(slide, 2.0, 16)
    path = save_grid(tmp_path / "g.h5", ms.main, {"instance_labels": np.arange(len(ms.main))}, low=ms.low)
    back = load_grid(path)
    np.testing.assert_array_equal(back.coords, ms.main.coords)
    assert (back.level, back.read_size, back.size_level0, back.target_mpp) == (
        ms.main.level, ms.main.read_size, ms.main.size_level0, ms.main.target_mpp)
    np.testing.assert_array_equal(back.extra["instance_labels"], np.arange(len(ms.main)))
    np.testing.assert_array_equal(load_grid(path, group="low").coords, ms.low.coords)
    assert not list(tmp_path.glob(".*tmp"))


def _assert_same_multiscale(a, b):
    for x, y in ((a.main, b.main), (a.low, b.low)):
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_array_equal(x.tissue_fraction, y.tissue_fraction)
        assert x.attrs() == y.attrs()
    np.testing.assert_array_equal(a.main_to_low, b.main_to_low)
    assert a.low_factor == b.low_factor


def test_grid_cache_hit_miss_and_corrupt_rebuild(tiny_slide, tmp_path, monkeypatch):
    monkeypatch.setenv("MILSTUDY_CACHE", str(tmp_path))
    calls = []
    real = tiling.multiscale_grid
    monkeypatch.setattr(tiling, "multiscale_grid", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = cached_multiscale_grid(tiny_slide, 2.0, 16, 2, 0.5, slide_id="s1")
    files = list((tmp_path / "grids").glob("*.h5"))
    assert len(calls) == 1 and len(files) == 1
    hit = cached_multiscale_grid(tiny_slide, 2.0, 16, 2, 0.5, slide_id="s1")
    assert len(calls) == 1  # served from the cache file
    _assert_same_multiscale(hit, first)
    _assert_same_multiscale(hit, multiscale_grid(tiny_slide, 2.0, 16, 2, 0.5, slide_id="s1"))
    cached_multiscale_grid(tiny_slide, 2.0, 16, 2, 0.3, slide_id="s1")  # another min_tissue: a miss
    assert len(calls) == 2 and len(list((tmp_path / "grids").glob("*.h5"))) == 2
    files[0].write_bytes(b"not an hdf5 file")  # corrupt: rebuilt, same grids
    rebuilt = cached_multiscale_grid(tiny_slide, 2.0, 16, 2, 0.5, slide_id="s1")
    assert len(calls) == 3
    _assert_same_multiscale(rebuilt, first)
    assert cached_multiscale_grid(tiny_slide, 2.0, 16, 2, 0.5, slide_id="s1") is not None and len(calls) == 3
    assert not list((tmp_path / "grids").glob(".*tmp"))


def test_bad_parameters_are_named(tiny_slide):
    slide = open_slide(tiny_slide)
    with pytest.raises(ValueError, match="min_tissue"):
        tile_slide(slide, 1.0, 32, min_tissue=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        tile_slide(slide, 1.0, 0)
