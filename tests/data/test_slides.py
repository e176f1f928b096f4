"""Slides through OpenSlide: pyramidal TIFFs written and read back, resolution, bad inputs, worker safety."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from milstudy.data.slides import (
    CorruptRegionError,
    SlideError,
    SlideResolutionError,
    _downsample2,
    open_slide,
    write_pyramidal_tiff,
)


def test_roundtrip_levels_resolution_and_pixels(tiny_slide, rendered):
    image = rendered[0]
    slide = open_slide(tiny_slide)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count >= 3
    assert slide.dimensions == (1024, 768)
    assert slide.mpp == pytest.approx(0.5)
    assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
    assert slide.level_mpp(2) == pytest.approx(2.0)
    np.testing.assert_array_equal(slide.read_region((300, 200), 0, (97, 61)), image[200:261, 300:397])
    np.testing.assert_array_equal(slide.read_level(1), _downsample2(image))
    assert slide.thumbnail(128).shape[1] == 128


def test_jpeg_pyramid_is_close_to_source(tmp_path, rendered):
    path = write_pyramidal_tiff(tmp_path / "j.tiff", rendered[0], 0.25, compression="jpeg")
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.25)
    region = slide.read_region((0, 0), 0, (1024, 768)).astype(float)
    assert np.abs(region - rendered[0]).mean() < 6.0


def test_tile_source_writer_matches_in_memory_writer(tmp_path, rendered):
    image = rendered[0]
    a = write_pyramidal_tiff(tmp_path / "a.tiff", image, 0.5, compression="zlib", tile=128)
    b = write_pyramidal_tiff(
        tmp_path / "b.tiff", None, 0.5, compression="zlib", tile=128,
        tile_source=lambda y, x, h, w: image[y : y + h, x : x + w], shape=image.shape[:2],
    )
    sa, sb = open_slide(a), open_slide(b)
    assert sa.level_dimensions == sb.level_dimensions
    for level in range(sa.level_count):
        np.testing.assert_array_equal(sa.read_level(level), sb.read_level(level))


def test_best_level_for_mpp(tiny_slide):
    slide = open_slide(tiny_slide)
    assert slide.best_level_for_mpp(0.5) == 0
    assert slide.best_level_for_mpp(0.9) == 0
    assert slide.best_level_for_mpp(1.0) == 1
    assert slide.best_level_for_mpp(2.5) == 2
    assert slide.best_level_for_mpp(0.1) == 0


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(SlideError, match="not found") as info:
        open_slide(tmp_path / "nope.svs")
    assert "nope.svs" in str(info.value)


def test_not_a_slide(not_a_slide):
    with pytest.raises(SlideError, match="not a slide") as info:
        open_slide(not_a_slide)
    assert str(not_a_slide) in str(info.value)


def test_truncated_tiff(truncated_slide):
    with pytest.raises(SlideError, match="truncated or corrupt|not a slide") as info:
        open_slide(truncated_slide)
    assert str(truncated_slide) in str(info.value)


def test_slide_without_resolution_is_refused_unless_mpp_given(noresolution_slide):
    with pytest.raises(SlideResolutionError, match="mpp="):
        open_slide(noresolution_slide)
    assert open_slide(noresolution_slide, mpp=0.3).mpp == pytest.approx(0.3)


def test_corrupt_tile_raises_then_slide_goes_on(corrupt_tile_slide):
    path, image, (x0, y0, x1, y1) = corrupt_tile_slide
    slide = open_slide(path)
    with pytest.raises(CorruptRegionError, match="corrupt.tiff"):
        slide.read_region((x0 + 10, y0 + 10), 0, (32, 32))
    # the handle was reset: other regions still read correctly
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (64, 64)), image[:64, :64])


def test_slide_pickles_without_handle_and_reopens(tiny_slide, rendered):
    slide = open_slide(tiny_slide)
    slide.read_region((0, 0), 0, (8, 8))
    clone = pickle.loads(pickle.dumps(slide))
    assert clone._handle is None
    np.testing.assert_array_equal(clone.read_region((5, 7), 0, (16, 16)), rendered[0][7:23, 5:21])
