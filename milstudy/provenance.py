"""Provenance of a notebook run: what ``run.json`` holds (code version, parameters, packages, machine, timing).

Every results folder carries one ``run.json`` so that a figure can be traced to the commit, the parameters,
the package versions and the hardware that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from milstudy.paths import REPO_ROOT

# Distributions whose versions decide the numbers (distribution names, as pip knows them).
TRACKED_PACKAGES = (
    "milstudy", "torch", "torchvision", "timm", "numpy", "scipy", "pandas", "scikit-learn", "scikit-survival",
    "scikit-image", "umap-learn", "openslide-python", "openslide-bin", "h5py", "matplotlib", "papermill",
    "nbclient", "ipykernel",
)


def now_iso() -> str:
    """Current time, ISO 8601 with timezone, second resolution."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def git_info(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}``; None when ``repo`` is not a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None if not installed); reads metadata, imports nothing."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), e.g. "Intel(R) Xeon(R)
    Processor": float32 results of long training runs differ between instruction sets, so records name it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def device_info() -> dict[str, Any]:
    """The compute the kernel will see: CUDA device names if any, else CPU; always the CPU count and model."""
    info: dict[str, Any] = {"kind": "cpu", "name": platform.processor() or platform.machine(),
                            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cuda_devices": []}
    if not (shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists()):
        return info  # no NVIDIA driver: skip importing torch (seconds) just to learn there is no GPU
    try:
        import torch  # imported here only: the runner itself needs no torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info.update(kind="cuda", name=names[0], cuda_devices=names)
    except Exception:  # torch missing or a broken driver: record the CPU and go on
        pass
    return info


def environment_info() -> dict[str, Any]:
    """Everything about the machine and software that does not change between notebooks of one batch."""
    return {
        "git": git_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device_info(),
    }


def device_line(device: dict[str, Any]) -> str:
    """One short description for the results index, e.g. ``cpu x2`` or ``cuda NVIDIA A100 x4``."""
    if device.get("kind") == "cuda":
        return f"cuda {device.get('name')} x{len(device.get('cuda_devices') or [1])}"
    model = f" ({device['cpu_model']})" if device.get("cpu_model") else ""
    return f"cpu x{device.get('cpu_count')}{model}"


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name next to ``path`` (created with its folder), then rename it into
    place (``os.replace``); the temporary file never survives, whatever ``write`` raises. A full disk is raised
    as ``OSError(ENOSPC)`` naming ``path``."""
    import errno
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from err
        raise
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_h5(path: Path, fill: Callable[[Any], None]) -> Path:
    """An HDF5 file built in memory (``fill(handle)`` writes its datasets and attributes; about the size of the
    arrays, which are in memory already) and written with :func:`atomic_write_bytes`: a full disk is one
    ``OSError(ENOSPC)`` naming ``path``, never an error inside HDF5's own writes or a partial file."""
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        fill(handle)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> Path:
    """``data`` to ``path`` atomically with plain file I/O (serialise in memory first, e.g. ``torch.save`` into a
    ``BytesIO``: a library's own writer reports a full disk in its own words; ``write`` raises ``OSError``)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON via a temporary name in the same folder and ``os.replace``."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_run_json(folder: Path) -> dict[str, Any] | None:
    """The ``run.json`` of a results folder, or None if absent/unreadable."""
    try:
        return json.loads((Path(folder) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
