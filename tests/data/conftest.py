"""Shared fixtures of the data-layer tests: tiny pyramidal TIFFs (≤ 1024 px) and broken files."""

from __future__ import annotations

import numpy as np
import pytest

from milstudy.data.slides import write_pyramidal_tiff
from milstudy.data.synthetic.renderer import FocusSpec, render_slide

MPP = 0.5


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every cache (cohorts, patch banks, real-tissue slide) goes to a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MILSTUDY_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def rendered():
    """A 768 x 1024 synthetic image with two tumour foci and its label map (downsample 8)."""
    image, label_map = render_slide(
        1024, 768, np.random.default_rng(3), [FocusSpec(0.12, "glands"), FocusSpec(0.03, "single_file")]
    )
    return image, label_map


@pytest.fixture(scope="session")
def tiny_slide(tmp_path_factory, rendered):
    """Lossless (deflate) pyramidal TIFF of ``rendered`` at 0.5 µm/px: exact pixels can be compared."""
    path = tmp_path_factory.mktemp("slides") / "tiny.tiff"
    return write_pyramidal_tiff(path, rendered[0], MPP, compression="zlib", tile=128)


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("blank") / "blank.tiff"
    return write_pyramidal_tiff(path, np.full((512, 512, 3), 246, np.uint8), MPP, compression="zlib", tile=128)


@pytest.fixture(scope="session")
def noresolution_slide(tmp_path_factory, rendered):
    path = tmp_path_factory.mktemp("nores") / "nores.tiff"
    return write_pyramidal_tiff(path, rendered[0][:512, :512], None, compression="zlib", tile=128)


@pytest.fixture(scope="session")
def truncated_slide(tmp_path_factory, tiny_slide):
    path = tmp_path_factory.mktemp("trunc") / "truncated.tiff"
    data = tiny_slide.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture(scope="session")
def not_a_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("notslide") / "notes.tiff"
    path.write_text("this is a text file, not a slide\n" * 20)
    return path


@pytest.fixture(scope="session")
def corrupt_tile_slide(tmp_path_factory):
    """512 x 512 deflate TIFF with 128-px tiles whose level-0 tile (row 3, col 3) is overwritten with garbage.

    Returns (path, image, corrupt box (x0, y0, x1, y1) in level-0 px)."""
    import tifffile

    rng = np.random.default_rng(0)
    image = np.full((512, 512, 3), 200, np.uint8)
    image[:, :, 1] = rng.integers(60, 140, (512, 512), dtype=np.uint8)  # saturated pink: tissue everywhere
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.tiff"
    write_pyramidal_tiff(path, image, MPP, compression="zlib", tile=128)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[15], page.databytecounts[15]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(rng.integers(0, 256, count, dtype=np.uint8)))
    return path, image, (384, 384, 512, 512)
