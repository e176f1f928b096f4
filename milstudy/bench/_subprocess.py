"""Run one benchmark case in a fresh Python process (its own peak RSS, no allocator state from earlier cases)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def max_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(module: str, function: str, *args: object, timeout: float) -> dict:
    """``module.function(*args)`` in a fresh interpreter; its JSON-able dict return value plus ``status`` ("ok",
    "timeout after ...", or the last line of the error)."""
    code = (f"import json; from {module} import {function}; "
            f"print(json.dumps({function}({', '.join(repr(a) for a in args)})))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {"status": "error: " + lines[-1][:200]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}
