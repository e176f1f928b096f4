"""pyproject.toml and environment.yml list the same runtime dependencies; torch builds stay pinned."""

from __future__ import annotations

import re
import tomllib

import yaml

from milstudy.paths import REPO_ROOT


def _name(requirement: str) -> str:
    """'scikit-learn>=1.4' -> 'scikit-learn' (PEP 503 normalised, extras and markers dropped)."""
    name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _conda_pip_requirements() -> list[str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    return [r for r in pip_sections[0] if not r.startswith("-")]  # '-e .' installs the package itself


def test_runtime_dependencies_match():
    in_pyproject = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    in_conda = {_name(r) for r in _conda_pip_requirements()}
    assert in_pyproject - in_conda == set(), "in pyproject.toml but not in environment.yml"
    assert in_conda - in_pyproject == set(), "in environment.yml but not in pyproject.toml"


def test_environment_installs_the_package_on_python_311():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in plain and "pip" in plain
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(r.startswith("-e .") for r in pip_section)


def test_torch_builds_are_pinned():
    deps = [r.replace(" ", "") for r in _pyproject()["project"]["dependencies"]]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    conda = [r.replace(" ", "") for r in _conda_pip_requirements()]
    assert "torch==2.14.1" in conda and "torchvision==0.29.1" in conda


def test_python_version_and_console_script():
    project = _pyproject()["project"]
    assert "3.11" in project["requires-python"]
    assert project["scripts"]["milstudy"] == "milstudy.cli:main"
