"""The study catalog: which notebooks exist, their parameters, and how parameters resolve per profile.

``notebooks/studies.yaml`` lists every notebook (stem -> paper, title, parameters, per-profile overrides).
Each notebook declares its parameters in one code cell tagged ``parameters`` (papermill's convention); this
module reads that cell with :mod:`ast` (never executes it) so that a typo or a wrong type is caught before
any kernel starts.

Resolution order (later wins): the notebook's ``parameters`` cell < studies.yaml ``parameters`` <
studies.yaml ``profiles[<profile>]`` < command-line ``-p key=value``. ``profile`` is always injected.
"""

from __future__ import annotations

import ast
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("smoke", "cpu", "paper")
_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "tuple": tuple}


class StudyError(ValueError):
    """Bad input to the runner (unknown notebook/profile/parameter, malformed value): one clear line."""


@dataclass(frozen=True)
class Parameter:
    """One assignment of a notebook's ``parameters`` cell. ``kind`` is the expected type (None: any)."""

    name: str
    default: Any
    kind: type | None
    optional: bool = False  # annotated ``X | None`` / ``Optional[X]``, or default None


@dataclass
class Study:
    """One notebook of the study as listed in studies.yaml."""

    stem: str
    path: Path
    paper: str = ""
    title: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget_min: dict[str, float] = field(default_factory=dict)  # wall-time budget per profile, minutes


# ----------------------------------------------------------------------------------------- studies.yaml
def load_studies(studies_file: Path, notebooks_dir: Path | None = None) -> dict[str, Study]:
    """Read studies.yaml -> {stem: Study} in file order; notebooks live in ``notebooks_dir`` (default: beside it)."""
    studies_file = Path(studies_file)
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else studies_file.parent
    if not studies_file.is_file():
        raise StudyError(f"{studies_file}: studies file not found")
    try:
        doc = yaml.safe_load(studies_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{studies_file}: not valid YAML ({err})") from err
    entries = doc.get("notebooks") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise StudyError(f"{studies_file}: expected a top-level mapping 'notebooks: {{<stem>: {{...}}}}'")
    studies: dict[str, Study] = {}
    for stem, entry in entries.items():
        entry = entry or {}
        where = f"{studies_file}: notebooks.{stem}"
        if not isinstance(entry, dict):
            raise StudyError(f"{where}: expected a mapping with paper, title, parameters, profiles")
        parameters = entry.get("parameters") or {}
        profiles = entry.get("profiles") or {}
        if not isinstance(parameters, dict) or not isinstance(profiles, dict):
            raise StudyError(f"{where}: 'parameters' and 'profiles' must be mappings")
        for name, overrides in profiles.items():
            if name not in PROFILES:
                raise StudyError(f"{where}.profiles: unknown profile {name!r}; known profiles: {', '.join(PROFILES)}")
            if overrides is not None and not isinstance(overrides, dict):
                raise StudyError(f"{where}.profiles.{name}: expected a mapping of parameter overrides")
        budgets = entry.get("budget_min") or {}
        if not isinstance(budgets, dict) or any(k not in PROFILES for k in budgets) or \
                not all(isinstance(v, (int, float)) and v > 0 for v in budgets.values()):
            raise StudyError(f"{where}.budget_min: expected {{profile: minutes > 0}} for profiles {', '.join(PROFILES)}")
        studies[str(stem)] = Study(
            stem=str(stem),
            path=notebooks_dir / f"{stem}.ipynb",
            paper=str(entry.get("paper", "")),
            title=str(entry.get("title", "")),
            parameters=dict(parameters),
            profiles={k: dict(v or {}) for k, v in profiles.items()},
            budget_min={k: float(v) for k, v in budgets.items()},
        )
    return studies


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise StudyError(f"unknown profile {profile!r}{_did_you_mean(profile, list(PROFILES))}; "
                         f"choose one of: {', '.join(PROFILES)}")
    return profile


def select_studies(studies: dict[str, Study], names: list[str], run_all: bool = False) -> list[Study]:
    """Resolve NOTEBOOK arguments (stem, file name, path or bare number) to studies, in studies.yaml order."""
    if run_all:
        chosen = list(studies.values())
    elif not names:
        raise StudyError("name the notebooks to run (e.g. 00_quickstart) or pass --all")
    else:
        wanted = set()
        for name in names:
            stem = Path(name).name.removesuffix(".ipynb")
            numbered = [s for s in studies if s.split("_", 1)[0] == stem]  # `10` -> 10_abmilx_...
            if stem not in studies and len(numbered) == 1:
                stem = numbered[0]
            if stem not in studies:
                raise StudyError(
                    f"unknown notebook {name!r}{_did_you_mean(stem, list(studies))}: not listed in studies.yaml; "
                    f"known notebooks: {', '.join(studies) or '(none)'}"
                )
            wanted.add(stem)
        chosen = [s for s in studies.values() if s.stem in wanted]
    for study in chosen:
        if not study.path.is_file():
            raise StudyError(f"notebook {study.stem!r} is listed in studies.yaml but {study.path} does not exist")
    return chosen


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); ``i`` is 0-based (0 <= i < n), matching e.g. ``SLURM_ARRAY_TASK_ID`` with ``--array=0-(n-1)``."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise StudyError(f"--shard {text!r}: expected i/n with integers, e.g. 0/4 (i is 0-based)") from None
    if count < 1 or not 0 <= index < count:
        raise StudyError(f"--shard {text!r}: need n >= 1 and 0 <= i < n (i is 0-based)")
    return index, count


def shard(items: list[Study], index: int, count: int) -> list[Study]:
    """Deterministic share: sort by stem, take every ``count``-th starting at ``index``; shards partition the batch."""
    return sorted(items, key=lambda s: s.stem)[index::count]


# ----------------------------------------------------------------------------------- the parameters cell
def _annotation_kind(node: ast.expr | None) -> tuple[type | None, bool]:
    """``int`` -> (int, False); ``float | None`` / ``Optional[float]`` -> (float, True); anything else -> (None, False)."""
    if node is None:
        return None, False
    if isinstance(node, ast.Name):
        return _TYPE_NAMES.get(node.id), False
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if node.value.id == "Optional":
            return _annotation_kind(node.slice)[0], True
        return _TYPE_NAMES.get(node.value.id), False  # list[str] -> list
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        if any(isinstance(s, ast.Constant) and s.value is None for s in sides):
            other = next(s for s in sides if not (isinstance(s, ast.Constant) and s.value is None))
            return _annotation_kind(other)[0], True
    return None, False


def parse_parameters_source(source: str, where: str = "parameters cell") -> dict[str, Parameter]:
    """Read ``name = literal`` / ``name: type = literal`` lines of a parameters cell (not executed)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise StudyError(f"{where}: syntax error in the parameters cell, line {err.lineno}: {err.msg}") from None
    found: dict[str, Parameter] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value_node, annotation = node.targets[0].id, node.value, None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value_node, annotation = node.target.id, node.value, node.annotation
        else:
            continue
        try:
            default = ast.literal_eval(value_node)
            literal = True
        except (ValueError, SyntaxError, TypeError):
            default, literal = None, False
        kind, optional = _annotation_kind(annotation)
        if kind is None and literal and default is not None:
            kind = type(default)
        found[name] = Parameter(name, default, kind, optional or (literal and default is None))
    return found


def notebook_parameters(path: Path) -> dict[str, Parameter]:
    """The declared parameters of a notebook file; errors if it has no (or several) ``parameters`` cells."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StudyError(f"{path}: cannot read notebook ({err})") from None
    cells = [
        c for c in nb.get("cells", [])
        if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if len(cells) != 1:
        raise StudyError(f"{path}: expected exactly one code cell tagged 'parameters', found {len(cells)}")
    source = cells[0].get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    return parse_parameters_source(source, where=str(path))


# ------------------------------------------------------------------------------------- merge and check
def parse_cli_parameters(pairs: list[str] | None) -> dict[str, tuple[Any, str]]:
    """``["epochs=3", "models=[a,b]"]`` -> {name: (yaml-parsed value, raw text)}."""
    parsed: dict[str, tuple[Any, str]] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise StudyError(f"-p {pair!r}: expected key=value with a Python name as key, e.g. -p epochs=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: keep the text as a string
        parsed[name] = (value, raw)
    return parsed


def _coerce_cli_value(value: Any, raw: str, param: Parameter) -> Any:
    """YAML reads ``-p name=123`` as int and ``-p lr=1e-3`` as text; follow the declared type where unambiguous."""
    if param.kind is str and not isinstance(value, str):
        return raw  # a string parameter keeps the text as typed
    if param.kind is float and isinstance(value, str):
        try:
            return float(raw)
        except ValueError:
            return value
    return value


def _type_ok(value: Any, param: Parameter) -> bool:
    kind = param.kind
    if kind is None or (value is None and param.optional):
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def resolve_parameters(
    study: Study, profile: str, cli: dict[str, tuple[Any, str]] | None = None,
    declared: dict[str, Parameter] | None = None,
) -> dict[str, Any]:
    """Merge cell defaults < studies.yaml < profile overrides < ``-p``; check names and types; inject ``profile``."""
    check_profile(profile)
    declared = notebook_parameters(study.path) if declared is None else declared
    layers = [
        ("studies.yaml parameters", study.parameters),
        (f"studies.yaml profiles.{profile}", study.profiles.get(profile, {})),
        ("-p", {k: v for k, (v, _) in (cli or {}).items()}),
    ]
    merged = {name: p.default for name, p in declared.items()}
    for source, values in layers:
        for name, value in values.items():
            if name == "profile":
                raise StudyError(f"{study.stem}: set the profile with --profile, not as a parameter ({source})")
            if name not in declared:
                valid = ", ".join(sorted(declared)) or "(none)"
                raise StudyError(
                    f"{study.stem}: unknown parameter {name!r} (from {source}){_did_you_mean(name, list(declared))}; "
                    f"valid parameters: {valid}"
                )
            param = declared[name]
            if source == "-p":
                value = _coerce_cli_value(value, cli[name][1], param)
            if not _type_ok(value, param):
                expected = param.kind.__name__ + (" or None" if param.optional else "")
                raise StudyError(
                    f"{study.stem}: parameter {name!r} (from {source}) expects {expected}, "
                    f"got {type(value).__name__} {value!r}"
                )
            merged[name] = value
    merged["profile"] = profile
    return merged


def last_recorded_run(results_dir: Path, stem: str) -> dict[str, Any] | None:
    """``run.json`` of the last successful run of notebook ``stem`` under ``results_dir`` (``results/<profile>``), or
    None when it has not run there."""
    import json

    path = Path(results_dir) / stem / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def budget_line(study: Study, profile: str, record: dict[str, Any] | None) -> str:
    """``budget 12 min; last run 7.1 min at <commit>`` (``OVER BUDGET`` when the recorded run took longer)."""
    budget = study.budget_min.get(profile)
    parts = [f"budget {budget:g} min" if budget else "no budget"]
    if record and isinstance(record.get("wall_time_s"), (int, float)):
        minutes = record["wall_time_s"] / 60
        commit = str((record.get("git") or {}).get("commit", ""))[:9] or "unknown commit"
        parts.append(f"last run {minutes:.1f} min at {commit}")
        if budget and minutes > budget:
            parts.append("OVER BUDGET")
    else:
        parts.append("not run yet")
    return "; ".join(parts)
