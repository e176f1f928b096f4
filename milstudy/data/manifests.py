"""Cohort manifests: one validated table schema for every cohort, patient-level splits, slide checks.

A manifest is a CSV (or DataFrame) with one row per slide:

| column | meaning |
|---|---|
| ``slide_id`` | unique slide identifier; feature files are named ``<slide_id>.h5`` |
| ``case_id`` | patient identifier; splits never put one case in two partitions |
| ``path`` | slide file, relative to a slide root (``MILSTUDY_SLIDE_ROOT`` or an argument) or absolute |
| ``label`` / ``grade`` | class label (string or int) / ordinal grade (int >= 0) |
| ``survival_months`` / ``event`` | follow-up time (>= 0) and 1 = event observed, 0 = censored |
| ``report`` | free-text pathology report (optional) |
| ``split`` | ``train`` / ``val`` / ``test`` |
| ``fold_<k>`` | the same, for fold k of a cross-validation |

Other columns (e.g. ``label_3``, ``oversample``, ``mask_path``) pass through untouched.
Every validation error names the file, the row (file line, header = line 1) and the column.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from milstudy.paths import slide_root as _env_slide_root

log = logging.getLogger("milstudy.data")

SPLIT_VALUES = ("train", "val", "test")
TEXT_COLUMNS = ("slide_id", "case_id", "path", "report", "split")
DEFAULT_REQUIRE = ("slide_id", "case_id", "path")
FOLD_PATTERN = re.compile(r"^fold_(\d+)$")


class ManifestError(ValueError):
    """A manifest does not follow the schema; the message names file, row(s) and column."""


def fold_columns(df: pd.DataFrame) -> list[str]:
    """The ``fold_<k>`` columns of a manifest, sorted by k."""
    found = [(int(m.group(1)), c) for c in df.columns if (m := FOLD_PATTERN.match(str(c)))]
    return [c for _, c in sorted(found)]


def _rows(source: str, index: Iterable, from_file: bool) -> str:
    """Human-readable row references: file lines (header = line 1) or DataFrame index labels."""
    idx = list(index)
    shown = ", ".join(str(i + 2) if from_file else str(i) for i in idx[:10])
    more = f" (+{len(idx) - 10} more)" if len(idx) > 10 else ""
    kind = "line" if from_file else "row"
    return f"{source} {kind}{'s' if len(idx) > 1 else ''} {shown}{more}"


def _read(path_or_df: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str, bool]:
    if isinstance(path_or_df, pd.DataFrame):
        return path_or_df.copy(), "manifest (DataFrame)", False
    path = Path(path_or_df)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        header = pd.read_csv(path, nrows=0).columns
        text = {c: "string" for c in header if c in TEXT_COLUMNS or FOLD_PATTERN.match(str(c)) or c == "label_3"}
        df = pd.read_csv(path, dtype=text, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: empty file; a manifest needs a header line (slide_id,path,...) and one row "
                            "per slide") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise ManifestError(f"{path}: not a readable CSV manifest ({str(err).strip()})") from None
    if df.empty:
        raise ManifestError(f"{path}: the manifest has a header ({', '.join(map(str, header))}) but no slide rows")
    return df.reset_index(drop=True), str(path), True


def load_manifest(
    path_or_df: str | os.PathLike | pd.DataFrame,
    slide_root: str | os.PathLike | None = None,
    require: Sequence[str] = DEFAULT_REQUIRE,
) -> pd.DataFrame:
    """Read and validate a manifest; returns a new DataFrame (the input is never modified).

    ``require`` lists columns that must exist and be non-empty. When ``case_id`` is absent and not required,
    it defaults to ``slide_id`` (one slide per patient). With ``slide_root`` given, relative ``path`` values are
    made absolute (see ``resolve_paths``). Raises ``ManifestError`` naming the file, row and column.
    """
    df, source, from_file = _read(path_or_df)
    _censorship_to_event(df, source, from_file)
    missing = [c for c in require if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{source}: missing required column(s) {missing}; found columns {list(df.columns)}"
        )
    if "case_id" not in df.columns and "slide_id" in df.columns:
        df["case_id"] = df["slide_id"]
    for col in TEXT_COLUMNS + tuple(fold_columns(df)):
        if col in df.columns:
            df[col] = df[col].astype("string").str.strip()
    for col in require:
        empty = df.index[df[col].isna() | (df[col].astype("string").str.len() == 0)]
        if len(empty):
            raise ManifestError(f"{_rows(source, empty, from_file)}: column '{col}' is empty")
    if "slide_id" in df.columns:
        dup = df.index[df["slide_id"].duplicated(keep=False) & df["slide_id"].notna()]
        if len(dup):
            first = df.loc[dup[0], "slide_id"]
            raise ManifestError(
                f"{_rows(source, dup, from_file)}: duplicate slide_id (e.g. '{first}'); each slide must appear once"
            )
    _check_numeric(df, source, from_file)
    for col in (["split"] if "split" in df.columns else []) + fold_columns(df):
        _check_split_column(df, col, source, from_file)
    if slide_root is not None:
        df = resolve_paths(df, slide_root, source=source if from_file else None)
    return df


def _censorship_to_event(df: pd.DataFrame, source: str, from_file: bool) -> None:
    """CLAM / PORPOISE survival CSVs give ``censorship`` (1 = censored, 0 = event observed): add ``event`` =
    1 - censorship (said in a log line), or check that both columns agree when the manifest has both."""
    if "censorship" not in df.columns:
        return
    values = pd.to_numeric(df["censorship"], errors="coerce")
    bad = df.index[df["censorship"].notna() & ~values.isin([0, 1])]
    if len(bad):
        raise ManifestError(f"{_rows(source, bad, from_file)}: column 'censorship' must be 0 (event observed) or 1 "
                            f"(censored), got {df.loc[bad[0], 'censorship']!r}")
    event = 1 - values
    if "event" in df.columns:
        given = pd.to_numeric(df["event"], errors="coerce")
        clash = df.index[given.notna() & event.notna() & (given != event)]
        if len(clash):
            raise ManifestError(f"{_rows(source, clash, from_file)}: columns 'event' and 'censorship' disagree "
                                "(event must be 1 - censorship); keep one of them")
        return
    df["event"] = event.astype("Int64")
    log.info("%s: survival events from column 'censorship' (CLAM/PORPOISE convention): event = 1 - censorship "
             "(%d events, %d censored)", source, int((event == 1).sum()), int((event == 0).sum()))


def _check_numeric(df: pd.DataFrame, source: str, from_file: bool) -> None:
    if "event" in df.columns:
        values = pd.to_numeric(df["event"], errors="coerce")
        bad = df.index[df["event"].notna() & ~values.isin([0, 1])]
        if len(bad):
            raise ManifestError(
                f"{_rows(source, bad, from_file)}: column 'event' must be 0 (censored) or 1 (event), "
                f"got {df.loc[bad[0], 'event']!r}"
            )
        df["event"] = values.astype("int64") if values.notna().all() else values.astype("Int64")
    if "mpp" in df.columns:
        values = pd.to_numeric(df["mpp"], errors="coerce")
        bad = df.index[df["mpp"].notna() & ~(values > 0) | df["mpp"].notna() & ~np.isfinite(values.fillna(1))]
        if len(bad):
            raise ManifestError(
                f"{_rows(source, bad, from_file)}: column 'mpp' must be a positive number of µm per level-0 pixel "
                f"(or empty to use the slide's metadata), got {df.loc[bad[0], 'mpp']!r}"
            )
        df["mpp"] = values.astype("float64")
    for col, integer in (("survival_months", False), ("grade", True)):
        if col not in df.columns:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad_mask = df[col].notna() & (values.isna() | (values < 0) | ~np.isfinite(values.fillna(0)))
        if integer:
            bad_mask |= values.notna() & (values != values.round())
        bad = df.index[bad_mask]
        if len(bad):
            kind = "a non-negative integer" if integer else "a non-negative number"
            raise ManifestError(
                f"{_rows(source, bad, from_file)}: column '{col}' must be {kind}, got {df.loc[bad[0], col]!r}"
            )
        if integer:
            df[col] = values.astype("int64") if values.notna().all() else values.astype("Int64")
        else:
            df[col] = values.astype("float64")


def _check_split_column(df: pd.DataFrame, col: str, source: str, from_file: bool) -> None:
    bad = df.index[~df[col].isin(SPLIT_VALUES)]
    if len(bad):
        raise ManifestError(
            f"{_rows(source, bad, from_file)}: column '{col}' must be one of {list(SPLIT_VALUES)}, "
            f"got {df.loc[bad[0], col]!r}"
        )
    per_case = df.groupby("case_id")[col].nunique()
    for case in per_case.index[per_case > 1]:
        rows = df.index[df["case_id"] == case]
        values = sorted(df.loc[rows, col].unique())
        raise ManifestError(
            f"{_rows(source, rows, from_file)}: case '{case}' is in more than one partition of column "
            f"'{col}' ({values}); all slides of a patient must share one partition"
        )


def resolve_paths(
    df: pd.DataFrame,
    slide_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    source: str | None = None,
) -> pd.DataFrame:
    """Copy of ``df`` with ``path`` made absolute under ``slide_root`` (default: ``MILSTUDY_SLIDE_ROOT``).

    Absolute paths stay as they are (``data check`` lists them). A relative path that climbs out of the root
    with ``..`` (``../outside/x.tiff``) raises ``ManifestError`` naming the row unless ``allow_outside_root``
    (``--allow-outside-root``); the check is lexical, so symbolic links inside the root stay fine. Raises
    ``ManifestError`` when a relative path has no root to resolve against.
    """
    out = df.copy()
    root = _env_slide_root(slide_root)
    paths = out["path"].astype("string")
    relative = ~paths.map(lambda p: os.path.isabs(p) if isinstance(p, str) else True)
    if relative.any() and root is None:
        raise ManifestError(
            f"{int(relative.sum())} slide path(s) are relative (e.g. '{paths[relative].iloc[0]}') but no slide root "
            "was given: pass slide_root / --slide-root or set MILSTUDY_SLIDE_ROOT"
        )
    if not allow_outside_root:
        climbing = [i for i in out.index[relative] if _climbs_out(str(paths[i]))]
        if climbing:
            where = _rows(source, climbing, True) if source else f"manifest row(s) {climbing[:10]}"
            raise ManifestError(
                f"{where}: column 'path' {str(paths[climbing[0]])!r} climbs out of the slide root {root} with '..'; "
                "fix the path, use an absolute path, or pass --allow-outside-root (allow_outside_root=True) if "
                "this is intended"
            )
    out.loc[relative, "path"] = [str(Path(root) / p) for p in paths[relative]]
    out["path"] = out["path"].astype("string")
    return out


def _climbs_out(relative: str) -> bool:
    """True if the relative path ``relative`` leaves its root lexically (``a/../../b``, ``../b``)."""
    normal = os.path.normpath(relative.replace("\\", "/"))
    return normal == ".." or normal.startswith("../") or normal.startswith("..\\")


def is_outside(path: str | os.PathLike, root: str | os.PathLike | None) -> bool:
    """True if ``path`` (as written, symbolic links not followed) is not under ``root``."""
    if root is None:
        return False
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return False
    except ValueError:
        return True


# --------------------------------------------------------------------------------------- output paths
class OutputPathError(ManifestError):
    """A slide_id cannot name a file inside the output folder (traversal, separators, two rows on one file)."""


def output_path(out_dir: str | os.PathLike, slide_id: str, suffix: str) -> Path:
    """``<out_dir>/<slide_id><suffix>``, refused (``OutputPathError``) unless it is a plain file name inside
    ``out_dir``: no path separators, not ``.``/``..``, no NUL, and the resolved path stays in the folder."""
    name = str(slide_id)
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip()
            or os.path.isabs(name)):
        raise OutputPathError(
            f"slide_id {name!r} cannot name an output file <slide_id>{suffix}: slide ids must be plain file names "
            "(no '/', '\\', '..' or surrounding spaces); rename the slide in the manifest"
        )
    out = Path(out_dir).resolve()
    target = out / f"{name}{suffix}"
    if target.resolve().parent != out:
        raise OutputPathError(f"slide_id {name!r}: {target} would be written outside the output folder {out}")
    return target


def output_paths(
    slide_ids: Sequence[str], out_dir: str | os.PathLike, suffix: str, source: str = "manifest",
    lines: Sequence[int] | None = None,
) -> list[Path]:
    """:func:`output_path` of every slide id; also refuses two ids mapping to one file (``A`` / ``a`` on a
    case-insensitive filesystem). Messages name ``source`` and the row (file line when ``lines`` are given)."""
    seen: dict[str, int] = {}
    paths = []
    for i, slide_id in enumerate(slide_ids):
        where = f"{source} line {lines[i]}" if lines is not None else f"{source} row {i}"
        try:
            path = output_path(out_dir, slide_id, suffix)
        except OutputPathError as err:
            raise OutputPathError(f"{where}: {err}") from None
        key = os.path.normcase(str(path)).casefold()
        if key in seen:
            other = f"line {lines[seen[key]]}" if lines is not None else f"row {seen[key]}"
            raise OutputPathError(
                f"{where}: slide_id {slide_id!r} maps to the same output file {path.name} as {other} "
                f"({slide_ids[seen[key]]!r}); slide ids must differ in more than letter case")
        seen[key] = i
        paths.append(path)
    return paths


def manifest_lines(df: pd.DataFrame, manifest: object) -> list[int] | None:
    """File lines (header = 1) of a manifest read from a file, else None."""
    return None if isinstance(manifest, pd.DataFrame) else [int(i) + 2 for i in df.index]


def row_mpp(row: pd.Series, flag: float | None = None) -> float | None:
    """The one resolution rule of every command: the manifest ``mpp`` column of the row, else the command's
    ``--slide-mpp`` flag, else None (the slide's own metadata)."""
    value = row.get("mpp") if hasattr(row, "get") else None
    if value is not None and not pd.isna(value):
        return float(value)
    return None if flag is None else float(flag)


MPP_HINT = "set the manifest 'mpp' column for this slide or pass --slide-mpp <µm per level-0 pixel>"


def with_mpp_hint(message: str) -> str:
    """A slide reader's message with its Python-level remedy ("pass mpp=...") replaced by :data:`MPP_HINT`."""
    return message.replace("pass mpp=<µm per level-0 pixel>", MPP_HINT)


def open_manifest_slide(path: str | os.PathLike, mpp: float | None = None):
    """``open_slide(path, mpp=mpp)`` for a command that reads a manifest: an unknown resolution names the remedies
    these commands offer (:data:`MPP_HINT`), not the Python argument."""
    from milstudy.data.slides import SlideResolutionError, open_slide

    try:
        return open_slide(path, mpp=mpp)
    except SlideResolutionError as err:
        raise SlideResolutionError(with_mpp_hint(str(err))) from None


# --------------------------------------------------------------------------------------- patient-level splits
def _strata(df: pd.DataFrame, stratify: str | None) -> np.ndarray:
    if "case_id" not in df.columns:
        raise ManifestError("patient-level splits need a 'case_id' column")
    if stratify is None:
        return np.zeros(len(df), dtype=int)
    if stratify not in df.columns:
        raise ManifestError(f"cannot stratify on '{stratify}': no such column (have {list(df.columns)})")
    return df[stratify].astype("string").fillna("<missing>").to_numpy(dtype=str)


def _group_folds(df: pd.DataFrame, n_splits: int, stratify: str | None, seed: int) -> list[set[str]]:
    """Case ids of each test fold of a shuffled ``StratifiedGroupKFold`` (groups = case_id)."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = df["case_id"].astype("string").to_numpy(dtype=str)
    y = _strata(df, stratify)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": stratify as far as possible
        warnings.simplefilter("ignore", UserWarning)
        return [set(groups[test_idx]) for _, test_idx in splitter.split(np.zeros(len(df)), y, groups)]


def _hold_out(df: pd.DataFrame, fraction: float, stratify: str | None, seed: int) -> set[str]:
    """Case ids of a held-out share of about ``fraction`` of the slides: one fold of round(1 / fraction)."""
    n_cases = df["case_id"].nunique()
    if fraction <= 0 or n_cases < 2:
        return set()
    n_splits = min(max(2, int(round(1 / fraction))), n_cases)
    return _group_folds(df, n_splits, stratify, seed)[0]


def patient_split(
    df: pd.DataFrame, val: float = 0.15, test: float = 0.15, stratify: str | None = "label", seed: int = 0
) -> pd.DataFrame:
    """Copy of ``df`` with a ``split`` column (train/val/test) assigned per case (patient), stratified by slides' ``stratify``.

    Uses scikit-learn's ``StratifiedGroupKFold`` (groups = case_id): the test set is one fold of round(1 / test)
    folds, the validation set one fold of the rest, so fractions are met up to that rounding and to case sizes.
    Deterministic in ``seed``.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val={val} and test={test} must be fractions in [0, 1) with val + test < 1")
    cases = df["case_id"].astype("string")
    test_ids = _hold_out(df, test, stratify, seed)
    rest = df[~cases.isin(test_ids)]
    val_ids = _hold_out(rest, val / (1 - test), stratify, seed)
    out = df.copy()
    out["split"] = pd.Series("train", index=df.index, dtype="string")
    out.loc[cases.isin(val_ids), "split"] = "val"
    out.loc[cases.isin(test_ids), "split"] = "test"
    return out


def patient_kfold(
    df: pd.DataFrame, k: int = 5, stratify: str | None = "label", seed: int = 0, val: float = 0.0
) -> pd.DataFrame:
    """Copy of ``df`` with columns ``fold_0 .. fold_{k-1}``: every case is ``test`` in exactly one fold.

    Uses scikit-learn's ``StratifiedGroupKFold`` (groups = case_id, shuffled with ``seed``). With ``val`` > 0 a
    stratified, patient-level share of about ``val`` of all slides is taken from each fold's training cases.
    """
    if k < 2:
        raise ValueError(f"k={k}: a k-fold split needs k >= 2")
    n_cases = df["case_id"].nunique()
    if n_cases < k:
        raise ValueError(f"k={k} folds need at least {k} cases, the manifest has {n_cases}")
    cases = df["case_id"].astype("string")
    out = df.copy()
    for fold, test_ids in enumerate(_group_folds(df, k, stratify, seed)):
        column = pd.Series("train", index=df.index, dtype="string")
        column[cases.isin(test_ids)] = "test"
        if val:
            train = df[~cases.isin(test_ids)]
            column[cases.isin(_hold_out(train, val / (1 - 1 / k), stratify, seed + fold))] = "val"
        out[f"fold_{fold}"] = column
    return out


# --------------------------------------------------------------------------------------------- slide checks
def _opener():
    """The project's slide opener when the slides layer exists, else OpenSlide directly."""
    try:
        from milstudy.data.slides import open_slide

        return open_slide
    except ImportError:
        import openslide

        return openslide.OpenSlide


def check_slides(
    manifest: str | os.PathLike | pd.DataFrame, slide_root: str | os.PathLike | None = None, progress: bool = True,
    slide_mpp: float | None = None, allow_outside_root: bool = False,
) -> pd.DataFrame:
    """Open every slide of a manifest the way tiling will (same resolution rule, :func:`row_mpp`, and the level
    tissue segmentation reads).

    Returns a DataFrame with ``slide_id``, ``path`` (resolved), ``status`` (``ok`` / ``missing`` /
    ``unreadable`` / ``duplicate file``: one file under two slide_ids, a train/test leak) and ``message``
    (the reader's error; for ok rows a note such as "absolute path outside the slide root").
    """
    from tqdm.auto import tqdm

    source = None if isinstance(manifest, pd.DataFrame) else str(manifest)
    df = resolve_paths(load_manifest(manifest, require=("slide_id", "path")), slide_root,
                       allow_outside_root=allow_outside_root, source=source)
    root = _env_slide_root(slide_root)
    opener = _opener()
    records = []
    first_of: dict[str, str] = {}
    for (_, row), slide_id, path in tqdm(zip(df.iterrows(), df["slide_id"], df["path"]), total=len(df),
                                         desc="checking slides", unit="slide", disable=not progress):
        status, message = "ok", ""
        if not os.path.exists(path):
            status, message = "missing", "file not found"
        else:
            key = os.path.realpath(path)
            if key in first_of:
                status, message = "duplicate file", (f"same file as slide '{first_of[key]}' ({key}); one slide under "
                                                     "two slide_ids leaks between splits: keep one row")
            else:
                first_of[key] = slide_id
            try:
                mpp = row_mpp(row, slide_mpp)
                slide = opener(path, mpp=mpp) if opener.__name__ == "open_slide" else opener(path)
                if hasattr(slide, "level_dimensions") and hasattr(slide, "mpp"):
                    from milstudy.data.tissue import check_segmentation_level, choose_mask_level

                    check_segmentation_level(slide, choose_mask_level(slide))
                close = getattr(slide, "close", None)
                if close is not None:
                    close()
            except Exception as err:  # any reader failure is a finding, not a crash
                text = with_mpp_hint(str(err))
                status, message = "unreadable", f"{type(err).__name__}: {text}".strip()
        if status == "ok" and root is not None and is_outside(path, root):
            message = f"absolute path outside the slide root {root}"
        records.append({"slide_id": slide_id, "path": path, "status": status, "message": message})
    return pd.DataFrame.from_records(records, columns=["slide_id", "path", "status", "message"])
