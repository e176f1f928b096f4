"""The study's notebooks: all listed in studies.yaml, one parameters cell each, committed without outputs, and
each one executes under the smoke profile through the runner (one test per notebook, into a temporary results root)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from milstudy import runner
from milstudy.paths import notebooks_dir
from milstudy.studies import load_studies, notebook_parameters

NOTEBOOKS_DIR = notebooks_dir()
STUDIES = load_studies(NOTEBOOKS_DIR / "studies.yaml", NOTEBOOKS_DIR)
NOTEBOOK_FILES = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_every_notebook_is_listed_and_every_entry_exists():
    on_disk = {p.stem for p in NOTEBOOK_FILES}
    assert on_disk - set(STUDIES) == set(), "notebooks missing from notebooks/studies.yaml"
    assert set(STUDIES) - on_disk == set(), "studies.yaml entries without a notebook file"


def test_studies_are_in_notebook_order_and_described():
    assert list(STUDIES) == sorted(STUDIES)
    for study in STUDIES.values():
        assert study.title and study.paper, f"{study.stem}: studies.yaml needs a title and a paper"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_with_profile_and_seed(path: Path):
    params = notebook_parameters(path)  # raises unless exactly one cell is tagged "parameters"
    assert params["profile"].default == "cpu" and params["seed"].kind is int


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    cells = json.loads(path.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `jupyter nbconvert --clear-output --inplace {path}`"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_profile_parameters_are_valid(path: Path):
    from milstudy.studies import PROFILES, resolve_parameters

    for profile in PROFILES:
        assert resolve_parameters(STUDIES[path.stem], profile)["profile"] == profile


@pytest.mark.notebook
@pytest.mark.parametrize("stem", sorted(STUDIES))
def test_notebook_executes_under_smoke_profile(stem: str, tmp_path: Path):
    outcomes = runner.run_batch([stem], profile="smoke", results_root=tmp_path, out=io.StringIO())
    assert len(outcomes) == 1
    outcome = outcomes[0]
    assert outcome.status == "ok", f"{stem} failed: {outcome.error_line()} (see {outcome.folder})"
    run = json.loads((tmp_path / "smoke" / stem / "run.json").read_text())
    assert run["status"] == "ok" and (tmp_path / "smoke" / stem / f"{stem}.ipynb").is_file()
