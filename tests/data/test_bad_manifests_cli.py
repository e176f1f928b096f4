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


@pytest.mark.parametrize("command", [["data", "tile"], ["features", "extract", "--encoder", "tiny_cnn"], ["data", "masks"]])
def test_a_slide_id_that_climbs_out_of_the_output_folder_is_refused(tmp_path, root, capsys, command):
    manifest = _manifest(tmp_path, [{"slide_id": "../escaped", "path": "a.tiff", "label": 0}])
    out = tmp_path / "out"
    if command == ["data", "masks"]:
        (tmp_path / "xml").mkdir()
        command = [*command, "--annotations", str(tmp_path / "xml")]
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


@pytest.mark.parametrize("command", [["data", "tile"], ["features", "extract", "--encoder", "tiny_cnn"], ["data", "masks"]])
def test_a_manifest_path_that_climbs_out_of_the_root_is_refused_by_every_command(tmp_path, root, capsys, command):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / "a.tiff", outside / "x.tiff")
    manifest = _manifest(tmp_path, [{"slide_id": "ok", "path": "a.tiff"}, {"slide_id": "x", "path": "../outside/x.tiff"}])
    if command == ["data", "masks"]:
        (tmp_path / "xml").mkdir()
        command = [*command, "--annotations", str(tmp_path / "xml")]
    out = tmp_path / "out"
    code = main([*command, "--manifest", str(manifest), "--slide-root", str(root), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "line 3" in err and "--allow-outside-root" in err, err
    assert not out.exists() or not list(out.iterdir())  # refused before anything is written


def test_data_masks_reads_the_manifest_mpp_column_and_names_the_flag(tmp_path, noresolution_slide, capsys):
    root = noresolution_slide.parent
    (tmp_path / "xml").mkdir()
    masks = ["data", "masks", "--annotations", str(tmp_path / "xml"), "--slide-root", str(root), "--quiet"]
    without = _manifest(tmp_path, [{"slide_id": "n", "path": noresolution_slide.name}], "without.csv")
    assert main([*masks, "--manifest", str(without), "--out", str(tmp_path / "m1")]) == 1
    out = capsys.readouterr().out
    assert "--slide-mpp" in out and "mpp=" not in out.replace("--slide-mpp", "")
    with_mpp = _manifest(tmp_path, [{"slide_id": "n", "path": noresolution_slide.name, "mpp": 0.5}], "with.csv")
    assert main([*masks, "--manifest", str(with_mpp), "--out", str(tmp_path / "m2")]) == 0
    assert (tmp_path / "m2" / "n.png").is_file()


def test_data_check_and_tile_read_the_manifest_mpp_column(tmp_path, noresolution_slide, capsys):
    root = noresolution_slide.parent
    without = _manifest(tmp_path, [{"slide_id": "n", "path": noresolution_slide.name}], "without.csv")
    assert main(["data", "check", "--manifest", str(without), "--slide-root", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "mpp' column" in out and "--slide-mpp" in out  # the hint names what the manifest can say and the flag
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


def test_a_full_disk_while_tiling_is_one_line_per_slide_and_keeps_the_finished_grids(tmp_path, root, monkeypatch,
                                                                                    capsys):
    """Item 4 / 7: ENOSPC writing the second grid (injected at the one plain write every grid goes through): that
    slide is an error that says "disk full" and names its file, the first grid is intact, no temporary file or
    traceback, the summary is written, exit 1; the rerun with room exits 0 with a clean run's grids."""
    import errno

    import milstudy.provenance as provenance

    shutil.copy(root / "a.tiff", root / "b.tiff")
    real = provenance.atomic_write_bytes

    def full_for_b(path, data):
        if path.name == "b.h5":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))  # as atomic_write raises it
        return real(path, data)

    clean = tmp_path / "clean"
    slides = ["--slides", str(root / "a.tiff"), str(root / "b.tiff")]
    assert main(["data", "tile", *slides, "--out", str(clean), "--quiet"]) == 0
    monkeypatch.setattr(provenance, "atomic_write_bytes", full_for_b)
    out = tmp_path / "tiles"
    code = main(["data", "tile", *slides, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    summary = pd.read_csv(out / "tiling_summary.csv").set_index("slide_id")
    assert code == 1 and summary.loc["b", "status"] == "error"
    assert summary.loc["b", "message"].startswith("disk full (ENOSPC) while writing: ")
    assert summary.loc["b", "message"].split(": ", 1)[1].split(";")[0].endswith("/b.h5")
    assert (out / "a.h5").read_bytes() == (clean / "a.h5").read_bytes() and not (out / "b.h5").exists()
    assert not list(out.glob(".*tmp*")) and "Traceback" not in captured.err
    monkeypatch.setattr(provenance, "atomic_write_bytes", real)  # room again: the rerun ends as a clean run
    assert main(["data", "tile", *slides, "--out", str(out), "--quiet"]) == 0
    assert all((out / n).read_bytes() == (clean / n).read_bytes() for n in ("a.h5", "b.h5"))


@pytest.mark.parametrize("command", ["data check", "data tile", "data masks", "features extract", "train"])
def test_a_header_only_manifest_is_one_line_naming_the_file_and_exit_2_in_every_command(tmp_path, root, capsys,
                                                                                        command):
    """Audit item 1: a manifest with a header and no rows is bad input in every manifest command: exit 2, one line
    on stderr naming the file, nothing on stdout, nothing written to --out (an empty run is never a result)."""
    import h5py
    import numpy as np

    manifest = tmp_path / "empty.csv"
    manifest.write_text("slide_id,path,label\n")
    out = tmp_path / "out"
    features = tmp_path / "features"  # train needs a feature folder with a bag to get as far as the manifest
    features.mkdir()
    with h5py.File(features / "a.h5", "w") as handle:
        handle.create_dataset("features", data=np.ones((3, 4), np.float32))
        handle.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    (tmp_path / "xml").mkdir()
    args = {"data check": ["data", "check", "--slide-root", str(root)],
            "data tile": ["data", "tile", "--slide-root", str(root), "--out", str(out)],
            "data masks": ["data", "masks", "--slide-root", str(root), "--annotations", str(tmp_path / "xml"),
                           "--out", str(out)],
            "features extract": ["features", "extract", "--encoder", "tiny_cnn", "--slide-root", str(root),
                                 "--out", str(out)],
            "train": ["train", "--features", str(features), "--model", "abmil", "--folds", "2", "--out", str(out)],
            }[command]
    code = main([*args, "--manifest", str(manifest), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.strip() == f"error: {manifest}: the manifest has a header (slide_id, path, label) but no " \
                                   "slide rows", captured.err
    assert captured.out == ""
    assert not out.exists() or not list(out.rglob("*"))
