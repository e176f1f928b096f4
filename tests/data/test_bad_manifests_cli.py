"""Bad manifests through the data and features commands (issue 11, items 3, 6 and 9): slide ids and paths that
escape their folders, one slide file under two ids, and the manifest's mpp column."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from milstudy.cli import main


def _manifest(tmp_path, rows, name="m.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture()
def root(tmp_path, tiny_slide):
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(tiny_slide, root / "a.tiff")
    return root


@pytest.mark.parametrize("command", [["data", "tile"], ["features", "extract", "--encoder", "tiny_cnn"]])
def test_a_slide_id_that_climbs_out_of_the_output_folder_is_refused(tmp_path, root, capsys, command):
    manifest = _manifest(tmp_path, [{"slide_id": "../escaped", "path": "a.tiff", "label": 0}])
    out = tmp_path / "out"
    code = main([*command, "--manifest", str(manifest), "--slide-root", str(root), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "../escaped" in err and "line 2" in err
    assert not (tmp_path / "escaped.h5").exists() and not list(tmp_path.glob("escaped*"))


def test_a_path_outside_the_slide_root_is_refused_unless_allowed(tmp_path, root, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / "a.tiff", outside / "x.tiff")
    manifest = _manifest(tmp_path, [{"slide_id": "x", "path": "../outside/x.tiff"}])
    assert main(["data", "check", "--manifest", str(manifest), "--slide-root", str(root), "--quiet"]) == 2
    assert "--allow-outside-root" in capsys.readouterr().err
    assert main(["data", "check", "--manifest", str(manifest), "--slide-root", str(root), "--quiet",
                 "--allow-outside-root"]) == 0


def test_one_slide_file_under_two_ids_is_reported_as_a_leak(tmp_path, root, capsys):
    manifest = _manifest(tmp_path, [{"slide_id": "s1", "path": "a.tiff", "split": "train"},
                                    {"slide_id": "s2", "path": "./a.tiff", "split": "test"}])
    code = main(["data", "check", "--manifest", str(manifest), "--slide-root", str(root), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "duplicate file" in out and "s2" in out and "'s1'" in out


def test_data_check_and_tile_read_the_manifest_mpp_column(tmp_path, noresolution_slide, capsys):
    root = noresolution_slide.parent
    without = _manifest(tmp_path, [{"slide_id": "n", "path": noresolution_slide.name}], "without.csv")
    assert main(["data", "check", "--manifest", str(without), "--slide-root", str(root), "--quiet"]) == 1
    assert "mpp' column" in capsys.readouterr().out  # the hint names what the manifest can say
    with_mpp = _manifest(tmp_path, [{"slide_id": "n", "path": noresolution_slide.name, "mpp": 0.5}], "with.csv")
    assert main(["data", "check", "--manifest", str(with_mpp), "--slide-root", str(root), "--quiet"]) == 0
    out = tmp_path / "tiles"
    assert main(["data", "tile", "--manifest", str(with_mpp), "--slide-root", str(root), "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "n.h5").is_file()


def test_data_tile_records_a_non_slide_error_and_goes_on(tmp_path, root, monkeypatch, capsys):
    """Item 4: a MemoryError (or a full disk) on one slide is recorded in the summary; the batch goes on."""
    import milstudy.data.tissue as tissue

    shutil.copy(root / "a.tiff", root / "b.tiff")
    real = tissue.segment_tissue

    def fails_on_a(slide, **kw):
        if str(getattr(slide, "path", "")).endswith("a.tiff"):
            raise MemoryError
        return real(slide, **kw)

    monkeypatch.setattr(tissue, "segment_tissue", fails_on_a)
    out = tmp_path / "tiles"
    code = main(["data", "tile", "--slides", str(root / "a.tiff"), str(root / "b.tiff"), "--out", str(out), "--quiet"])
    summary = pd.read_csv(out / "tiling_summary.csv").set_index("slide_id")
    assert code == 1 and summary.loc["a", "status"] == "error" and "out of memory" in summary.loc["a", "message"]
    assert summary.loc["b", "status"] == "ok" and (out / "b.h5").is_file() and not (out / "a.h5").exists()
    assert "error: a" in capsys.readouterr().out  # the problem is listed first


def test_segmentation_refuses_an_implausibly_large_single_level_slide():
    """Item 4: a single-level header of 100,000 x 100,000 px is refused before anything is read."""
    from types import SimpleNamespace

    from milstudy.data.slides import SlideError
    from milstudy.data.tissue import check_segmentation_level

    huge = SimpleNamespace(path="huge.tiff", level_dimensions=[(100_000, 100_000)])
    with pytest.raises(SlideError, match="huge.tiff.*too large to segment"):
        check_segmentation_level(huge, 0)
    check_segmentation_level(SimpleNamespace(path="ok.tiff", level_dimensions=[(4000, 3000)]), 0)
