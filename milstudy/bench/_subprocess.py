"""Run one benchmark case in a fresh Python process (its own peak RSS, no allocator state from earlier cases),
and read that process's peak memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def max_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5) and return the current RSS in MB; where that is not
    possible, the current max RSS (the delta then only sees growth beyond the earlier peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return max_rss_mb()


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB since the last :func:`reset_peak_rss` (``VmHWM``; else ``ru_maxrss``)."""
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return max_rss_mb()


def run_call(module: str, call: str, timeout: float, threads: int | None = None) -> dict:
    """Evaluate ``call`` (e.g. ``"measure_case('abmil', 1000)"``) after ``from module import *`` in a fresh
    interpreter (``OMP_NUM_THREADS=threads`` when given); its JSON-able dict plus ``status`` ("ok", "timeout after
    ...", or the last line of the error)."""
    code = f"import json; from {module} import *; print(json.dumps({call}))"
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode} (killed: memory?)"])[-1]
        return {"status": "error: " + tail[:200]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def run_case(module: str, function: str, *args: object, timeout: float, threads: int | None = None) -> dict:
    """``module.function(*args)`` in a fresh interpreter (see :func:`run_call`)."""
    return run_call(module, f"{function}({', '.join(repr(a) for a in args)})", timeout, threads)
