"""Where things live: repository root, results, caches and the slide root.

Environment variables override the defaults so that GPU clusters can put caches on scratch space:
``MILSTUDY_RESULTS`` (default ``<repo>/results``), ``MILSTUDY_CACHE`` (default ``<repo>/.cache``),
``MILSTUDY_SLIDE_ROOT`` (real cohorts; no default).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def results_root() -> Path:
    return Path(os.environ.get("MILSTUDY_RESULTS", REPO_ROOT / "results"))


def cache_root() -> Path:
    return Path(os.environ.get("MILSTUDY_CACHE", REPO_ROOT / ".cache"))


def slide_root(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit if explicit is not None else os.environ.get("MILSTUDY_SLIDE_ROOT")
    return Path(value) if value else None


def notebooks_dir() -> Path:
    return REPO_ROOT / "notebooks"
