"""Fault injection (issue 11): bad input never changes a result silently, never writes outside the output
folder, never loses a finished run. Each case asserts the message, the exit code and that finished outputs
survive unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from milstudy.cli import main
from milstudy.data.bag_checks import validate_bags
from milstudy.data.bags import BagDataset, BagError, BagListDataset, Bag
from milstudy.data.slides import write_pyramidal_tiff
from milstudy.train.tasks import ClassificationTask, LabelError, build_task

REPO = Path(__file__).resolve().parent.parent


def _digest(folder: Path, pattern: str = "*.h5") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob(pattern))}


def _bag(path: Path, features: np.ndarray) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features)
        handle.create_dataset("coords", data=np.zeros((len(features), 2), np.int64))


# ------------------------------------------------------------------------------ 1. labels outside the task
def test_typo_or_blank_label_is_refused_before_training():
    where = [f"cohort.csv line {i + 2} (slide s{i})" for i in range(4)]
    with pytest.raises(LabelError, match=r"cohort.csv line 5 \(slide s3\): label 'IDc' is not one of the task's "
                                         r"classes \['IDC', 'ILC'\]"):
        build_task({"type": "classification", "classes": ["IDC", "ILC"]}, ["IDC", "ILC", "ILC", "IDc"], where)
    with pytest.raises(LabelError, match=r"cohort.csv line 4 \(slide s2\): label is blank"):
        build_task(None, [0, 1, float("nan"), 1], where)
    with pytest.raises(LabelError, match=r"line 4 \(slide s2\): label 7 makes the labels \[0, 1, 7\]"):
        build_task(None, [0, 1, 7, 1], where)  # a typo'd 7 must not make an 8-class head
    with pytest.raises(LabelError, match=r"line 2 \(slide s0\): label 'IDC' is not an integer class index and no "
                                         r"classes were declared"):
        build_task(None, ["IDC", "ILC", "ILC", "IDC"], where)
    with pytest.raises(LabelError, match=r"line 3 \(slide s1\): label 3 is not one of the task's classes \[0, 1, 2\]"):
        build_task({"type": "grading", "n_grades": 3}, [0, 3], where)
    assert build_task(None, [1, 0, 1]).classes == [0, 1]
    assert build_task({"type": "grading", "n_grades": 4}, [0, 2]).n_out == 4  # declared: absent grades are fine


def test_task_accepts_class_names_or_dataset_indices(tmp_path):
    _bag(tmp_path / "a.h5", np.zeros((2, 3), np.float32))
    _bag(tmp_path / "b.h5", np.zeros((2, 3), np.float32))
    manifest = pd.DataFrame({"slide_id": ["a", "b"], "label": ["ILC", "IDC"]})
    ds = BagDataset(manifest, tmp_path, classes=["IDC", "ILC"])
    task = ClassificationTask(classes=ds.classes)
    assert task.make_targets(ds.targets).tolist() == [1, 0]
    assert task.make_targets(["ILC", "IDC"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="label 2 is not one of the task's classes"):
        task.make_targets([2])
    # int classes: an int is a class value, never an index
    assert ClassificationTask(classes=[1, 2]).make_targets([1, 2]).tolist() == [0, 1]


def test_bag_dataset_refuses_undeclared_non_contiguous_labels(tmp_path):
    for sid in ("a", "b", "c"):
        _bag(tmp_path / f"{sid}.h5", np.zeros((2, 3), np.float32))
    csv = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [0, 1, 4]}).to_csv(csv, index=False)
    with pytest.raises(BagError, match=rf"{csv} line 4: slide 'c' column 'label': label 4 makes the labels \[0, 1, 4\]"):
        BagDataset(csv, tmp_path)
    pd.DataFrame({"slide_id": ["a", "b", "c"], "label": ["A", "B", "b"]}).to_csv(csv, index=False)
    with pytest.raises(BagError, match=rf"{csv} line 4: slide 'c': label 'b' is not one of the classes"):
        BagDataset(csv, tmp_path, classes=["A", "B"])
    with pytest.raises(BagError, match=r"no classes were declared"):
        BagDataset(csv, tmp_path)
    pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [1, 0, 1]}).to_csv(csv, index=False)
    assert BagDataset(csv, tmp_path).classes == [0, 1]


# ------------------------------------------------------------------------------ 5. NaN/inf bags up front
def test_validate_bags_names_slide_and_file_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MILSTUDY_CACHE", str(tmp_path / "cache"))  # the verdict cache stays in this test's folder
    good = np.ones((4, 3), np.float32)
    _bag(tmp_path / "ok.h5", good)
    bad = good.copy()
    bad[2, 1] = np.inf
    _bag(tmp_path / "broken.h5", bad)
    manifest = pd.DataFrame({"slide_id": ["ok", "broken"], "label": [0, 1]})
    ds = BagDataset(manifest, tmp_path)  # lazy: construction does not read the features
    with pytest.raises(BagError, match=r"1 unusable bag\(s\): slide 'broken' \(.*broken.h5\): 1 instance\(s\) have "
                                       r"NaN/inf features \(first rows \[2\]\)"):
        validate_bags(ds)
    validate_bags(BagDataset(manifest.iloc[:1], tmp_path))
    validate_bags(BagDataset(manifest.iloc[:1], tmp_path))  # cached: a second pass is a stat per bag
    assert len(list((tmp_path / "cache" / "bag_checks").glob("*.ok"))) == 1  # one marker: the finite bag only
    _bag(tmp_path / "ok.h5", bad)  # the file changed: the cache must not vouch for it
    with pytest.raises(BagError, match="slide 'ok'"):
        validate_bags(BagDataset(manifest.iloc[:1], tmp_path))
    nan = torch.ones(3, 2)
    nan[1, 0] = float("nan")
    with pytest.raises(BagError, match=r"slide 'm' \(in memory\): 1 instance"):
        validate_bags(BagListDataset([Bag(features=nan, slide_id="m", target=0)]))


def test_validate_bags_refuses_a_bag_whose_coords_or_instance_labels_miss_rows(tmp_path, monkeypatch):
    """Audit item 8: a "short" bag (coords or instance_labels with fewer rows than features) is refused by
    validate_bags itself, naming slide, file and both counts, in our HDF5 layout, in torchmil's .npy layout and in
    memory, instead of passing validation and failing when the bag is first read; consistent bags pass."""
    monkeypatch.setenv("MILSTUDY_CACHE", str(tmp_path / "cache"))
    h5 = tmp_path / "h5"
    h5.mkdir()
    _bag(h5 / "ok.h5", np.ones((4, 3), np.float32))
    with h5py.File(h5 / "short.h5", "w") as handle:
        handle.create_dataset("features", data=np.ones((5, 3), np.float32))
        handle.create_dataset("coords", data=np.zeros((4, 2), np.int64))
    with h5py.File(h5 / "labels.h5", "w") as handle:
        handle.create_dataset("features", data=np.ones((5, 3), np.float32))
        handle.create_dataset("coords", data=np.zeros((5, 2), np.int64))
        handle.create_dataset("instance_labels", data=np.zeros(2, np.int64))
    manifest = pd.DataFrame({"slide_id": ["ok", "short", "labels"], "label": [0, 1, 0]})
    with pytest.raises(BagError) as refused:
        validate_bags(BagDataset(manifest, h5))
    assert str(refused.value) == (f"2 unusable bag(s): slide 'short' ({h5 / 'short.h5'}): 'coords' has 4 rows but "
                                  f"'features' has 5; re-extract the slide; slide 'labels' ({h5 / 'labels.h5'}): "
                                  "'instance_labels' has 2 rows but 'features' has 5; re-extract the slide")
    validate_bags(BagDataset(manifest.iloc[:1], h5))
    torchmil = tmp_path / "torchmil"
    for folder in ("features", "coords"):
        (torchmil / folder).mkdir(parents=True)
    for sid, n_coords in (("a", 3), ("b", 2)):
        np.save(torchmil / "features" / f"{sid}.npy", np.ones((3, 4), np.float32))
        np.save(torchmil / "coords" / f"{sid}.npy", np.zeros((n_coords, 2), np.int64))
    npy_manifest = pd.DataFrame({"slide_id": ["a", "b"], "label": [0, 1]})
    validate_bags(BagDataset(npy_manifest.iloc[:1], torchmil / "features"))  # a consistent .npy bag passes
    with pytest.raises(BagError, match=r"1 unusable bag\(s\): slide 'b' \(.*b\.npy\): 'coords' has 2 rows but "
                                       r"'features' has 3"):
        validate_bags(BagDataset(npy_manifest, torchmil / "features"))
    short = Bag(features=torch.ones(3, 2), slide_id="m", target=0, coords=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(BagError, match=r"slide 'm' \(in memory\): 'coords' has 2 rows but 'features' has 3"):
        validate_bags(BagListDataset([short]))


# ------------------------------------------------------------------- killed extraction, full disk (items 7, 10)
def _slides(root: Path, n: int = 4) -> pd.DataFrame:
    """``n`` small tissue slides (a pink disc on glass, 2 µm/px) and their manifest."""
    yy, xx = np.mgrid[:512, :512]
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = np.full((512, 512, 3), 245, np.uint8)
        disc = (yy - 256) ** 2 + (xx - 256) ** 2 < (150 + 10 * i) ** 2
        image[disc] = np.clip(np.array([215, 120, 180]) + rng.integers(-25, 25, (512, 512, 3)), 0, 255)[disc]
        write_pyramidal_tiff(root / f"s{i}.tiff", image, mpp=2.0, compression="zlib")
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i}", "path": f"s{i}.tiff", "label": i % 2})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return pd.DataFrame(rows)


EXTRACT = ["--encoder", "tiny_cnn", "--mpp", "4.0", "--patch-size", "32", "--batch-size", "8", "--workers", "0",
           "--device", "cpu"]


def _datasets(folder: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as handle:
            out[path.name] = (handle["features"][()].tobytes(), handle["coords"][()].tobytes())
    return out


def test_sigkilled_extraction_resumes_to_the_same_bags(tmp_path):
    """SIGKILL `milstudy features extract` once its first bag is written: the finished bags stay, no partial file
    is taken for a bag, and the rerun (exit 0) skips the finished slides and gives the bags of an uninterrupted run,
    byte for byte (two clean runs write byte-identical bags: checked first)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides)
    args = ["features", "extract", "--manifest", str(slides / "manifest.csv"), "--slide-root", str(slides), *EXTRACT]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    assert main([*args, "--out", str(tmp_path / "clean2")]) == 0
    clean = _digest(tmp_path / "clean")
    assert len(clean) == 4 and _digest(tmp_path / "clean2") == clean  # the file digests are a fair comparison
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "milstudy.cli", *args, "--out", str(killed)], env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("s*.h5")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = set(p.name for p in killed.glob("s*.h5"))
    assert finished and len(finished) < 4, "kill after the first bag, before the last"
    before = _digest(killed)
    assert all(before[name] == clean[name] for name in finished)  # what the killed run finished is whole
    assert main([*args, "--out", str(killed)]) == 0
    summary = pd.read_csv(killed / "extraction_summary.csv").set_index("slide_id")["status"]
    assert {f"{sid}.h5" for sid, status in summary.items() if status == "skipped"} == finished
    assert _datasets(killed) == _datasets(tmp_path / "clean")
    assert _digest(killed) == clean
    assert not list(killed.glob(".*.tmp"))


def test_full_disk_during_extraction_is_recorded_and_keeps_finished_bags(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the second bag (injected: no tmpfs can be mounted here): that slide is an error
    that says "disk full", the first bag is intact (byte-identical to a clean run's), no temporary file is left,
    the command exits 1; the rerun with room exits 0, skips the first bag and ends with a clean run's bags."""
    import milstudy.features as features

    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=2)
    args = ["features", "extract", "--manifest", str(slides / "manifest.csv"), "--slide-root", str(slides), *EXTRACT]
    assert main([*args, "--out", str(tmp_path / "clean"), "--quiet"]) == 0
    clean = _digest(tmp_path / "clean")
    real_write = features._write_bag

    def write_or_fail(path, *args, **kwargs):
        if path.name == "s1.h5":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(features, "_write_bag", write_or_fail)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([*args, "--out", str(out)])
    assert code == 1
    summary = pd.read_csv(out / "extraction_summary.csv").set_index("slide_id")
    assert summary.loc["s0", "status"] == "done" and summary.loc["s1", "status"] == "error"
    assert "disk full (ENOSPC)" in summary.loc["s1", "message"] and "s1.h5" in summary.loc["s1", "message"]
    assert "disk full" in capsys.readouterr().out
    assert BagDataset(pd.DataFrame({"slide_id": ["s0"], "label": [0]}), out)[0].features.shape[1] == 64
    assert not list(out.glob(".*tmp*")) and not (out / "s1.h5").exists()
    assert _digest(out) == {"s0.h5": clean["s0.h5"]}
    monkeypatch.setattr(features, "_write_bag", real_write)  # room again
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    summary = pd.read_csv(out / "extraction_summary.csv").set_index("slide_id")["status"]
    assert summary.to_dict() == {"s0": "skipped", "s1": "done"} and _digest(out) == clean


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 48 KiB tmpfs (where this machine lets the test mount one: root with CAP_SYS_ADMIN), else skip."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount_point)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC tests cover the same paths")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_full_disk_on_a_real_tmpfs_keeps_finished_bags(tmp_path, small_tmpfs, capsys):
    """`features extract` into a 48 KiB tmpfs that fills up after two bags (about 17 KiB each): the slides that
    did not fit are errors that say "disk full", the command exits 1, the bags that fit are byte-identical to those
    of a run with room, and no temporary file is left; a rerun with room skips the finished bags."""
    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=4)
    args = ["features", "extract", "--manifest", str(slides / "manifest.csv"), "--slide-root", str(slides), *EXTRACT]
    assert main([*args, "--out", str(tmp_path / "roomy")]) == 0
    capsys.readouterr()
    code = main([*args, "--out", str(small_tmpfs)])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    finished = _datasets(small_tmpfs)
    assert 1 <= len(finished) < 4, "the tmpfs must fill after the first bag and before the last"
    roomy = _datasets(tmp_path / "roomy")
    assert all(finished[name] == roomy[name] for name in finished)
    roomy_digest, finished_digest = _digest(tmp_path / "roomy"), _digest(small_tmpfs)
    assert finished_digest.keys() == finished.keys()
    assert all(digest == roomy_digest[name] for name, digest in finished_digest.items())  # whole files, not just data
    assert not list(small_tmpfs.glob(".*tmp*"))
    reported = [line for line in out.splitlines() if "disk full" in line]
    assert reported and all(line.strip().startswith("error: s") and line.rstrip().endswith("(finished slides are kept)")
                            for line in reported), out  # one line per slide, naming the bag file
    assert all(f"{small_tmpfs}/s" in line for line in reported)
    assert "Traceback" not in err and "Exception ignored" not in err  # nothing leaks from HDF5's own writes
    summary_path = small_tmpfs / "extraction_summary.csv"
    if summary_path.exists():  # written when it still fits; otherwise the one-line error above is the report
        summary = pd.read_csv(summary_path).set_index("slide_id")
        failed = summary[summary["status"] == "error"]
        assert len(failed) == 4 - len(finished) and failed["message"].str.contains("disk full").all()
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_tmpfs)], check=True, capture_output=True)
    assert main([*args, "--out", str(small_tmpfs)]) == 0
    assert _datasets(small_tmpfs) == roomy and _digest(small_tmpfs) == roomy_digest
    summary = pd.read_csv(small_tmpfs / "extraction_summary.csv").set_index("slide_id")["status"]
    assert {f"{sid}.h5" for sid, status in summary.items() if status == "skipped"} == set(finished)


def test_full_disk_in_any_command_is_one_line_and_exit_1(monkeypatch, capsys):
    import milstudy.features as features

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.h5")

    monkeypatch.setattr(features, "extract_features", full)
    code = main(["features", "extract", "--manifest", "m.csv", "--encoder", "tiny_cnn", "--out", "o"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == ("error: disk full (ENOSPC): /data/out/x.h5; free space and rerun (finished "
                                 "outputs are kept)")


def test_sigkilled_e2e_training_resumes_to_the_same_result(tmp_path):
    """SIGKILL the E2E command line (`python -m milstudy.train.e2e_cli`) after its second epoch's checkpoint: the
    same command then resumes from it and ends with the history, metrics and predictions of an uninterrupted run
    (exactly: the same floats)."""
    import yaml

    from milstudy.train.e2e_cli import main as e2e_main

    config = {"encoder": "tiny_cnn", "encoder_kwargs": {"widths": [8, 16, 32, 64]}, "aggregator": "abmil",
              "s": 8, "ratio": 4, "epochs": 6, "lr": 3e-3, "warmup_epochs": 0, "batch_slides": 2, "device": "cpu",
              "data": {"toy": {"n_slides": 8, "n_patches": 12, "size": 16}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    # every run on one torch thread, as the killed subprocess (OMP_NUM_THREADS=1): float reductions, and so the
    # trajectory, depend on the thread count, which an earlier test in this worker process may have changed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_and_resume_e2e(tmp_path, path, e2e_main)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume_e2e(tmp_path: Path, path: Path, e2e_main) -> None:
    import json

    assert e2e_main(["--config", str(path), "--out", str(tmp_path / "clean")]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "milstudy.train.e2e_cli", "--config", str(path), "--out",
                                str(killed)], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list((killed / "checkpoints").glob("epoch_0002*")) and time.monotonic() < deadline \
            and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists(), "killed before the end"
    assert e2e_main(["--config", str(path), "--out", str(killed)]) == 0
    drop = ["train_time", "time"]
    clean, resumed = (pd.read_csv(d / "history.csv").drop(columns=drop) for d in (tmp_path / "clean", killed))
    pd.testing.assert_frame_equal(clean, resumed, check_exact=True)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "clean", killed)]
    for m in metrics:
        m.pop("wall_time_s")
        m["config"].pop("checkpoint_dir")  # out/checkpoints of each run
    assert metrics[0] == metrics[1] and metrics[0]["best_epoch"] == 6
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "clean" / "predictions.csv"),
                                  pd.read_csv(killed / "predictions.csv"), check_exact=True)


def test_full_disk_during_e2e_training_is_one_line_and_the_rerun_with_room_finishes(tmp_path, small_tmpfs):
    """The E2E command line with its output on a 48 KiB tmpfs: the first checkpoint does not fit, so the command
    stops with one line naming the file that did not fit (no torch "enforce fail", no traceback), exit 1, no
    temporary file left; with room, the same command then gives the result of a run that never lacked space."""
    import yaml

    config = {"encoder": "tiny_cnn", "encoder_kwargs": {"widths": [8, 16, 32, 64]}, "aggregator": "abmil",
              "s": 8, "ratio": 4, "epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "batch_slides": 2, "device": "cpu",
              "data": {"toy": {"n_slides": 8, "n_patches": 12, "size": 16}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "milstudy.train.e2e_cli", "--config", str(path), "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*command, str(small_tmpfs)], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: disk full (ENOSPC): {small_tmpfs}/") and last.endswith(
        "; free space and rerun (finished outputs are kept)"), full.stderr
    assert "Traceback" not in full.stderr and "enforce fail" not in full.stderr
    assert not [p for p in small_tmpfs.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True, capture_output=True)
    rerun = subprocess.run([*command, str(small_tmpfs)], env=env, capture_output=True, text=True, timeout=300)
    roomy = subprocess.run([*command, str(tmp_path / "roomy")], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and roomy.returncode == 0, rerun.stderr + roomy.stderr
    pd.testing.assert_frame_equal(pd.read_csv(small_tmpfs / "predictions.csv"),
                                  pd.read_csv(tmp_path / "roomy" / "predictions.csv"))


def test_a_slide_above_the_unreadable_patch_threshold_fails_and_leaves_no_bag(tmp_path, capsys):
    """Item 10: 3 of 16 level-0 tiles corrupt = 12 of 64 patches (19 %) unreadable: above the default 10 % the
    slide is failed (no bag, exit 1, the message names --max-unreadable); a healthy slide beside it is done; with
    --max-unreadable 0.25 the slide is done and its failed patches are counted."""
    import tifffile

    slides = tmp_path / "slides"
    slides.mkdir()
    rng = np.random.default_rng(0)
    image = np.full((512, 512, 3), 200, np.uint8)
    image[:, :, 1] = rng.integers(60, 140, (512, 512), dtype=np.uint8)  # tissue everywhere
    for name in ("bad", "good"):
        write_pyramidal_tiff(slides / f"{name}.tiff", image, mpp=0.5, compression="zlib", tile=128)
    with tifffile.TiffFile(slides / "bad.tiff") as tif:
        page = tif.pages[0]
        spans = [(page.dataoffsets[i], page.databytecounts[i]) for i in (0, 5, 10)]
    with open(slides / "bad.tiff", "r+b") as handle:
        for offset, count in spans:
            handle.seek(offset)
            handle.write(bytes(rng.integers(0, 256, count, dtype=np.uint8)))
    pd.DataFrame({"slide_id": ["bad", "good"], "path": ["bad.tiff", "good.tiff"]}).to_csv(slides / "m.csv", index=False)
    args = ["features", "extract", "--manifest", str(slides / "m.csv"), "--slide-root", str(slides), "--encoder",
            "tiny_cnn", "--mpp", "0.5", "--patch-size", "64", "--min-tissue", "0", "--workers", "0", "--device",
            "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 1
    summary = pd.read_csv(out / "extraction_summary.csv").set_index("slide_id")
    assert summary.loc["bad", "status"] == "failed" and "--max-unreadable" in summary.loc["bad", "message"]
    assert "12 of 64" in summary.loc["bad", "message"], summary.loc["bad", "message"]
    assert summary.loc["good", "status"] == "done" and not (out / "bad.h5").exists() and (out / "good.h5").is_file()
    good = (out / "good.h5").read_bytes()
    assert main([*args, "--out", str(out), "--max-unreadable", "0.25"]) == 0
    summary = pd.read_csv(out / "extraction_summary.csv").set_index("slide_id")
    assert summary.loc["bad", "status"] == "done" and summary.loc["bad", "n_failed"] == 12
    assert summary.loc["good", "status"] == "skipped" and (out / "good.h5").read_bytes() == good


def test_extraction_resume_redoes_a_bag_made_with_other_weights_and_says_which_setting(tmp_path):
    """Item 2: a rerun with another encoder weights file (or another --min-tissue) redoes the slide and names the
    setting that differs; the same settings skip it."""
    from milstudy.encoders import build_encoder
    from milstudy.train.patch_pretrain import save_encoder

    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=1)
    args = ["features", "extract", "--manifest", str(slides / "manifest.csv"), "--slide-root", str(slides), *EXTRACT,
            "--out", str(tmp_path / "out"), "--quiet"]
    weights = save_encoder(build_encoder("tiny_cnn", seed=7), tmp_path / "other.safetensors")

    def status() -> tuple[str, str]:
        row = pd.read_csv(tmp_path / "out" / "extraction_summary.csv").iloc[0]
        return row["status"], str(row["message"])

    assert main(args) == 0 and status()[0] == "done"
    assert main(args) == 0 and status() == ("skipped", "already complete")
    assert main([*args, "--weights", str(weights)]) == 0
    assert status()[0] == "done" and status()[1].startswith("redone: settings changed (weight_hash ")
    assert main([*args, "--weights", str(weights), "--min-tissue", "0.3"]) == 0
    assert status() == ("done", "redone: settings changed (min_tissue 0.5 -> 0.3)")


def test_a_bad_e2e_setting_is_one_line_and_exit_2(tmp_path, capsys):
    import yaml

    from milstudy.train.e2e_cli import main as e2e_main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"encoder": "tiny_cnn", "data": {"toy": {"n_slides": 8}}}))
    assert e2e_main(["--config", str(path), "--set", "epochs=abc", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad E2E configuration: ") and "epochs" in err and len(err.splitlines()) == 1
    assert e2e_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file {tmp_path / 'missing.yaml'} not found"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ audit item 6: unsafe pickles
class _OpensAFile:
    """Unpickles as ``open(marker, "w")``: harmless, but it runs, and the marker file shows that it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _unsafe_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _OpensAFile(marker)}, path)
    return path


def test_the_unsafe_pickle_payload_would_run_when_loaded_unsafely(tmp_path):
    """The payload of the next test is live: a plain (not weights_only) load runs it."""
    marker = tmp_path / "ran"
    torch.load(_unsafe_checkpoint(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["features extract --weights", "eval --checkpoint"])
def test_an_unsafe_pickle_as_weights_or_checkpoint_is_refused_and_never_runs(tmp_path, capsys, command):
    """Audit item 6: a .pt whose unpickling would call a function, given as encoder weights or as a two-stage
    checkpoint, is refused: exit 2, one line (no ANSI colour codes from torch) saying it is not a safe weights_only
    checkpoint and naming the global torch refused; the payload never ran and nothing is written to --out."""
    marker = tmp_path / "ran"
    evil = _unsafe_checkpoint(tmp_path / "evil.pt", marker)
    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=1)
    features = tmp_path / "features"
    features.mkdir()
    _bag(features / "s0.h5", np.ones((4, 64), np.float32))
    out = tmp_path / "out"
    if command.startswith("features"):
        args = ["features", "extract", "--manifest", str(slides / "manifest.csv"), "--slide-root", str(slides),
                *EXTRACT, "--weights", str(evil)]
        what = f"weights file {evil}"
    else:
        args = ["eval", "--checkpoint", str(evil), "--manifest", str(slides / "manifest.csv"), "--features",
                str(features), "--device", "cpu"]
        what = f"--checkpoint {evil}"
    code = main([*args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "\x1b" not in err, repr(err)
    assert err.startswith(f"error: {what} is not a safe weights_only checkpoint (") and "io.open" in err, err
    assert not marker.exists(), "the pickled call ran"
    assert not out.exists() or not list(out.rglob("*"))


# ---------------------------------------------------- audit items 2 and 4: a zero-byte slide, the summary's order
def _per_slide(command: str, slides: Path, manifest: Path, out: Path) -> int:
    """`features extract` (tiny_cnn) or `data tile` over ``manifest``, quiet."""
    if command == "features extract":
        args = ["features", "extract", *EXTRACT]
    else:
        args = ["data", "tile"]
    return main([*args, "--manifest", str(manifest), "--slide-root", str(slides), "--out", str(out), "--quiet"])


@pytest.mark.parametrize("command", ["features extract", "data tile"])
def test_a_zero_byte_slide_is_a_per_slide_error_and_keeps_the_other_outputs(tmp_path, capsys, command):
    """Audit item 2: a zero-byte slide file (a copy that never finished) is one slide's error, exit 1, named in the
    summary file and listed under the headline; the other slide's output is byte-identical to a clean run's; rerun
    over a finished folder after the slide became zero bytes, its finished output is kept unchanged too."""
    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=2)
    manifest = slides / "manifest.csv"
    assert _per_slide(command, slides, manifest, tmp_path / "clean") == 0
    clean = _digest(tmp_path / "clean")
    assert set(clean) == {"s0.h5", "s1.h5"}
    capsys.readouterr()
    (slides / "s1.tiff").write_bytes(b"")
    out = tmp_path / "out"
    assert _per_slide(command, slides, manifest, out) == 1
    printed = capsys.readouterr().out.splitlines()
    status = "error" if command == "features extract" else "unreadable"
    summary = pd.read_csv(out / ("extraction_summary.csv" if command == "features extract" else "tiling_summary.csv"))
    summary = summary.set_index("slide_id")
    assert summary.loc["s1", "status"] == status and str(slides / "s1.tiff") in summary.loc["s1", "message"]
    assert summary.loc["s0", "status"] in ("done", "ok")
    assert _digest(out) == {"s0.h5": clean["s0.h5"]}  # the good slide's output as a clean run's, no s1 output
    assert len(printed) == 2 and printed[1].startswith(f"  {status}: s1") and str(slides / "s1.tiff") in printed[1]
    assert not list(out.glob(".*tmp*"))
    assert _per_slide(command, slides, manifest, tmp_path / "clean") == 1  # a finished folder, s1 now zero bytes
    assert _digest(tmp_path / "clean") == clean


@pytest.mark.parametrize("command", ["features extract", "data tile"])
def test_the_summary_lists_failures_first_then_other_problems_and_only_counts_done_slides(tmp_path, capsys,
                                                                                         command):
    """Audit item 4: manifest order ok, ok, glass (no tissue), zero-byte: stdout is the headline (the done slides
    only as a count), the failing slide, then the non-failing problem; no line for a done slide."""
    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=2)
    write_pyramidal_tiff(slides / "glass.tiff", np.full((512, 512, 3), 245, np.uint8), mpp=2.0, compression="zlib")
    (slides / "zero.tiff").write_bytes(b"")
    manifest = slides / "order.csv"
    pd.DataFrame({"slide_id": ["s0", "s1", "glass", "zero"],
                  "path": ["s0.tiff", "s1.tiff", "glass.tiff", "zero.tiff"]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    assert _per_slide(command, slides, manifest, out) == 1
    printed = capsys.readouterr().out.splitlines()
    if command == "features extract":
        headline, failing = f"4 slides: done 2, empty 1, error 1 -> {out}", "  error: zero: "
    else:
        headline, failing = f"tiled 2/4 slides, ", f"  unreadable: zero ({slides / 'zero.tiff'}): "
    assert len(printed) == 3, printed
    assert printed[0].startswith(headline) and printed[0].endswith(f"-> {out}"), printed
    assert printed[1].startswith(failing) and "not a slide OpenSlide can read" in printed[1], printed
    assert printed[2].startswith("  empty: glass") and "no tissue patches" in printed[2], printed


# ------------------------------------------------------------------- audit item 3: a broken bag through `train`
@pytest.mark.parametrize("fault", ["nan", "inf", "short coords"])
def test_a_broken_bag_stops_milstudy_train_before_training_and_writes_nothing(tmp_path, monkeypatch, capsys, fault):
    """Audit item 3: a NaN, an inf or a coords dataset one row short in one of eight bags (not the first): the
    train command stops before the first epoch with one line naming the slide and its file, exit 2 (a broken bag
    is bad input: BagError is a ValueError, cli.report_error), and --out is never created."""
    monkeypatch.setenv("MILSTUDY_CACHE", str(tmp_path / "cache"))
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        x = rng.normal(size=(5, 4)).astype(np.float32)
        n_coords = 5
        if i == 5:
            if fault == "short coords":
                n_coords = 4
            else:
                x[3, 1] = np.nan if fault == "nan" else np.inf
        with h5py.File(features / f"s{i}.h5", "w") as handle:
            handle.create_dataset("features", data=x)
            handle.create_dataset("coords", data=np.zeros((n_coords, 2), np.int64))
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(8)], "case_id": [f"c{i}" for i in range(8)],
                  "label": [i % 2 for i in range(8)]}).to_csv(manifest, index=False)
    import milstudy.train.two_stage as two_stage

    fits = []  # the training loop: it must never start
    real_fit = two_stage.fit
    monkeypatch.setattr(two_stage, "fit", lambda *args, **kwargs: fits.append(1) or real_fit(*args, **kwargs))
    out = tmp_path / "out"
    code = main(["train", "--manifest", str(manifest), "--features", str(features), "--model", "abmil", "--folds",
                 "2", "--epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    problem = ("'coords' has 4 rows but 'features' has 5" if fault == "short coords"
               else "1 instance(s) have NaN/inf features (first rows [3])")
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: slide 's5' ({features / 's5.h5'}): {problem}"), err
    assert not out.exists() and not fits


# --------------------------------------------------------------------- audit item 5: --debug shows the traceback
def test_debug_shows_the_traceback_of_a_bad_input_error_and_nothing_else_does(tmp_path):
    """Audit item 5: `milstudy data check --manifest missing.csv --quiet` is one line and exit 2; with --debug
    before the command or after its options the same error ends a Python traceback."""
    missing = tmp_path / "missing.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "milstudy.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    plain = run("data", "check", "--manifest", str(missing), "--quiet")
    assert plain.returncode == 2 and plain.stderr.strip() == f"error: manifest {missing} does not exist", plain.stderr
    assert "Traceback" not in plain.stderr
    for debug in (run("--debug", "data", "check", "--manifest", str(missing), "--quiet"),
                  run("data", "check", "--manifest", str(missing), "--quiet", "--debug")):
        assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):"), debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == f"FileNotFoundError: manifest {missing} does not exist"


# ------------------------------------------------------------------------- audit item 7: no network is needed
@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection and name lookup raises (and the block is checked to hold)."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(OSError, match="offline test"):
        socket.create_connection(("example.org", 443), timeout=1)
    with socket.socket() as sock, pytest.raises(OSError, match="offline test"):
        sock.connect(("127.0.0.1", 9))


def test_extraction_and_every_encoder_without_weights_work_offline(tmp_path, no_network):
    """Audit item 7: with sockets blocked, `features extract` (tiny_cnn) on a small slide succeeds, and every
    registered encoder builds without a weights file (random init, nothing fetched from a hub); the three presets
    over 300M parameters (uni, virchow, h_optimus_0) are left out for time: they take the same
    build_timm_encoder(pretrained=False) path as the presets h0_mini and ctranspath_like built here."""
    from milstudy.encoders import build_encoder, list_encoders

    slides = tmp_path / "slides"
    slides.mkdir()
    _slides(slides, n=1)
    out = tmp_path / "out"
    assert main(["features", "extract", "--manifest", str(slides / "manifest.csv"), "--slide-root", str(slides),
                 *EXTRACT, "--out", str(out), "--quiet"]) == 0
    assert pd.read_csv(out / "extraction_summary.csv")["status"].tolist() == ["done"] and (out / "s0.h5").is_file()
    names = [name for name in list_encoders() if name not in ("uni", "virchow", "h_optimus_0")]
    assert {"tiny_cnn", "resnet18_trunc", "vit_small_patch16", "h0_mini", "ctranspath_like"} <= set(names)
    for name in names:
        encoder = build_encoder(name, **({"in_dim": 8} if name == "descriptor_mlp" else {}))
        assert encoder.weight_hash == "random-init-seed0", name
