"""Lock files for the runner's temporary folders, so that a killed run's leftovers are cleaned on the next run
while a live ``--jobs`` / ``--shard`` run keeps its own (issue 11).

A temporary results folder (``.tmp-<stem>-<id>``, or ``.tmp-old-...`` while a result is swapped in) holds
``.lock``: ``{"pid": ..., "host": ...}`` of the process that made it. ``clean_stale(profile_dir)`` removes such a
folder only when its lock names a process on this host that no longer exists; folders locked on another host
(a shared filesystem), by a live process, or without a lock are kept and counted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

LOCK_NAME = ".lock"


def write_lock(folder: Path) -> Path:
    """Write ``folder/.lock`` naming this process and host."""
    path = Path(folder) / LOCK_NAME
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return path


def remove_lock(folder: Path) -> None:
    (Path(folder) / LOCK_NAME).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(profile_dir: Path) -> dict[str, list[str]]:
    """Remove the temporary folders of ``profile_dir`` whose lock names a dead process on this host.

    Returns ``{"removed": [...], "kept": [...]}`` (folder names); kept = live, other host, or no readable lock.
    """
    report: dict[str, list[str]] = {"removed": [], "kept": []}
    if not Path(profile_dir).is_dir():
        return report
    for folder in sorted(Path(profile_dir).glob(".tmp-*")):
        if not folder.is_dir():
            continue
        try:
            lock = json.loads((folder / LOCK_NAME).read_text())
            pid, host = int(lock["pid"]), str(lock["host"])
        except (OSError, ValueError, KeyError, TypeError):
            report["kept"].append(folder.name)
            continue
        if host == socket.gethostname() and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            report["removed"].append(folder.name)
        else:
            report["kept"].append(folder.name)
    return report
