"""Temporary folders of killed runs are cleaned on the next run; live runs keep theirs (issue 11, item 10)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from milstudy import runner
from milstudy.run_locks import LOCK_NAME, clean_stale, write_lock


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(root: Path, name: str, lock: dict | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "partial.csv").write_text("x\n")
    if lock is not None:
        (folder / LOCK_NAME).write_text(json.dumps(lock))
    return folder


def test_only_folders_of_dead_processes_on_this_host_are_removed(tmp_path):
    host = socket.gethostname()
    dead = _folder(tmp_path, ".tmp-a-1", {"pid": _dead_pid(), "host": host})
    live = _folder(tmp_path, ".tmp-b-2", {"pid": os.getpid(), "host": host})
    remote = _folder(tmp_path, ".tmp-c-3", {"pid": _dead_pid(), "host": host + "-elsewhere"})
    unlocked = _folder(tmp_path, ".tmp-old-d-4", None)
    result = _folder(tmp_path, "good", None)  # a finished result is never touched
    report = clean_stale(tmp_path)
    assert report == {"removed": [dead.name], "kept": [live.name, remote.name, unlocked.name]}
    assert not dead.exists() and live.exists() and remote.exists() and unlocked.exists() and result.exists()
    assert json.loads(write_lock(tmp_path / "good").read_text())["pid"] == os.getpid()


def test_sigkilled_notebook_run_leaves_a_locked_folder_that_the_next_run_cleans(study_tree):
    """SIGKILL a real `milstudy run` (its process group: runner and kernel) while the notebook executes: the
    earlier finished result is unchanged, the temporary folder names the dead runner, and the rerun removes it."""
    first = runner.run_batch(["good"], profile="smoke", out=io.StringIO(), **study_tree.locations())
    assert first[0].status == "ok"
    profile_dir = study_tree.results_root / "smoke"
    before = {p.name: p.read_bytes() for p in (profile_dir / "good").iterdir()}
    assert not list((profile_dir / "good").glob(LOCK_NAME))  # results carry no lock
    process = subprocess.Popen([sys.executable, "-m", "milstudy.cli", "run", "good", "--profile", "smoke",
                                *study_tree.cli_options()], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(profile_dir.glob(f".tmp-good-*/{LOCK_NAME}")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    leftovers = list(profile_dir.glob(".tmp-good-*"))
    assert len(leftovers) == 1, "the killed run should have left its temporary folder"
    assert {p.name: p.read_bytes() for p in (profile_dir / "good").iterdir()} == before
    log = io.StringIO()
    again = runner.run_batch(["good"], profile="smoke", out=log, **study_tree.locations())
    assert again[0].status == "ok" and "removed 1 temporary folder(s) left by killed runs" in log.getvalue()
    assert not list(profile_dir.glob(".tmp-*"))
    tables = {name: data for name, data in before.items() if name.endswith(".csv")}
    assert tables and {name: (profile_dir / "good" / name).read_bytes() for name in tables} == tables  # same result
