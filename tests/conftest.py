"""Shared pytest fixtures: a throw-away study (notebooks dir, studies.yaml, results root) built from tests/fixtures."""

from __future__ import annotations

import os

# Notebook kernels and torchrun workers started by tests inherit this: two xdist workers already fill the
# 2-core machine, and extra intra-op threads only spin (measured: 20x slower small convolutions under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

FIXTURE_STUDIES = """\
notebooks:
  bad:
    paper: none
    title: "Always raises in its third cell"
  good:
    paper: test
    title: "Saves a figure, a table and what it saw"
    parameters: {epochs: 3}
    profiles:
      smoke: {lr: 0.5}
      cpu: {}
"""


@dataclass
class StudyTree:
    notebooks_dir: Path
    studies_file: Path
    results_root: Path

    def locations(self) -> dict[str, Path]:
        """Keyword arguments for milstudy.runner.run_batch / write_report."""
        return {"notebooks_dir": self.notebooks_dir, "studies_file": self.studies_file,
                "results_root": self.results_root}

    def cli_options(self) -> list[str]:
        return ["--notebooks-dir", str(self.notebooks_dir), "--studies", str(self.studies_file),
                "--results-root", str(self.results_root)]


def make_study_tree(root: Path) -> StudyTree:
    """Copy the fixture notebooks into ``root/notebooks`` with a studies.yaml; results go to ``root/results``."""
    notebooks = root / "notebooks"
    notebooks.mkdir(parents=True)
    for path in FIXTURES.glob("*.ipynb"):
        shutil.copy(path, notebooks / path.name)
    studies = notebooks / "studies.yaml"
    studies.write_text(FIXTURE_STUDIES)
    return StudyTree(notebooks, studies, root / "results")


@pytest.fixture
def study_tree(tmp_path: Path) -> StudyTree:
    return make_study_tree(tmp_path)


@pytest.fixture(scope="session")
def study_tree_factory():
    """``make_study_tree`` for module-scoped fixtures (test modules must not `import conftest`: several
    conftest.py files share that module name)."""
    return make_study_tree


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread per test process: `make test` runs two xdist workers on a 2-core machine, and
    oversubscribed threads make small tensor work ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
