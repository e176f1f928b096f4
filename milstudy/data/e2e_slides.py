"""Slides and cases as the end-to-end path reads them (ABMILX paper, Tang, Qin et al.; specs/abmilx.md §2.2, §2.6).

- ``E2ESlide``: one slide's main- and low-scale patch grids and, on CPU, its uint8 patch banks ``[N, p, p, 3]``
  (``milstudy.data.patches.extract_patch_bank``); without banks, patches are read through OpenSlide on demand.
- ``E2ECase``: a multi-slide case as one bag (the union of its slides' patches, spec §2.6).
- ``slides_from_manifest`` tiles manifest rows at two scales; ``toy_slides`` builds an in-memory cohort for tests;
  ``load_data`` turns a run file's ``data`` section into slides per split and a task, applying the manifest's split
  or fold columns and the ``oversample`` column (upstream's duplicated training rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from milstudy.train.tasks import Task

log = logging.getLogger("milstudy.e2e")

class UnreadableSlideError(RuntimeError):
    """A slide whose patches cannot be read (file gone, corrupt); the trainer skips and counts it."""


@dataclass
class E2ESlide:
    """One slide for end-to-end training.

    main / low: uint8 patch banks ``[N, p, p, 3]`` / ``[M, p, p, 3]`` (None: read from ``path`` through OpenSlide
    with ``main_grid`` / ``low_grid``). coords: int ``[N, 2]`` level-0 main-scale coordinates.
    target: the raw target (label, or ``(time, event)`` for survival). instance_labels: optional int ``[N]``.
    low_coords: int ``[M, 2]`` level-0 coordinates of the low-scale patches when there is no ``low_grid``
        (toy cohorts); position-aware aggregators receive them with the sampled low-scale patches.
    """

    slide_id: str
    target: Any
    coords: np.ndarray
    main: np.ndarray | None = None
    low: np.ndarray | None = None
    path: str | None = None
    main_grid: Any = None
    low_grid: Any = None
    instance_labels: np.ndarray | None = None
    low_coords: np.ndarray | None = None

    @property
    def n_main(self) -> int:
        return len(self.coords)

    @property
    def patch_size(self) -> int:
        """Side in px of the stored main-scale patches."""
        if self.main is not None:
            return int(self.main.shape[1])
        if self.main_grid is not None:
            return int(self.main_grid.patch_size)
        return int(self.read("main", np.arange(1)).shape[1])

    @property
    def n_low(self) -> int:
        if self.low is not None:
            return len(self.low)
        return len(self.low_grid) if self.low_grid is not None else 0

    def coords_of(self, scale: str, indices: np.ndarray) -> np.ndarray | None:
        """Level-0 coordinates ``[len(indices), 2]`` of patches of ``scale``, or None when the slide has none."""
        if scale == "main":
            return self.coords[indices]
        source = self.low_grid.coords if self.low_grid is not None else self.low_coords
        return None if source is None else np.asarray(source)[indices]

    def read(self, scale: str, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), p, p, 3]`` patches of ``scale`` ("main" | "low"); UnreadableSlideError on failure."""
        bank = self.main if scale == "main" else self.low
        if bank is not None:
            return bank[indices]
        grid = self.main_grid if scale == "main" else self.low_grid
        if grid is None or self.path is None:
            raise UnreadableSlideError(f"slide {self.slide_id}: no {scale}-scale patch bank and no slide path/grid")
        from milstudy.data.patches import read_patch
        from milstudy.data.slides import open_slide

        try:
            slide = open_slide(self.path, mpp=grid.slide_mpp or None)
            try:
                return np.stack([read_patch(slide, grid, int(i)) for i in indices])
            finally:
                slide.close()
        except Exception as error:  # noqa: BLE001 - any read failure makes the slide unusable for this step
            raise UnreadableSlideError(f"slide {self.slide_id} ({self.path}): {type(error).__name__}: {error}") from error


@dataclass
class E2ECase(E2ESlide):
    """A multi-slide case as one bag (specs/abmilx.md §2.6: "a multi-WSI case is one bag: the union of its slides'
    patches"). Main- and low-scale indices run over ``parts`` in order; ``slide_id`` is the case id and ``coords`` /
    ``instance_labels`` are the parts' concatenated (coordinates stay per-slide level-0 pixels)."""

    parts: list[E2ESlide] = field(default_factory=list)

    @property
    def n_main(self) -> int:
        return sum(part.n_main for part in self.parts)

    @property
    def n_low(self) -> int:
        return sum(part.n_low for part in self.parts)

    def coords_of(self, scale: str, indices: np.ndarray) -> np.ndarray | None:
        if scale == "main":
            return self.coords[indices]
        pieces = [part.coords_of("low", np.arange(part.n_low)) for part in self.parts]
        return None if any(p is None for p in pieces) else np.concatenate(pieces)[indices]

    def read(self, scale: str, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return self.parts[0].read(scale, indices)
        sizes = [part.n_main if scale == "main" else part.n_low for part in self.parts]
        starts = np.cumsum([0] + sizes)
        owner = np.searchsorted(starts, indices, side="right") - 1
        out = None
        for k in np.unique(owner):
            at = np.flatnonzero(owner == k)
            patches = self.parts[k].read(scale, indices[at] - starts[k])
            if out is None:
                out = np.empty((len(indices),) + patches.shape[1:], patches.dtype)
            out[at] = patches
        return out


def cases_from_slides(slides: Sequence[E2ESlide], case_of: Mapping[str, str]) -> list[E2ESlide]:
    """One bag per case (``case_of[slide_id]``), in order of first appearance: a single-slide case is that slide
    renamed to the case id, several slides become an :class:`E2ECase`. Slides of one case must share the target."""
    groups: dict[str, list[E2ESlide]] = {}
    for slide in slides:
        groups.setdefault(str(case_of.get(slide.slide_id, slide.slide_id)), []).append(slide)
    out: list[E2ESlide] = []
    for case_id, members in groups.items():
        targets = {repr(m.target) for m in members}
        if len(targets) > 1:
            raise ValueError(f"case {case_id!r}: its slides {[m.slide_id for m in members]} have different targets "
                             f"{sorted(targets)}; a case-level bag needs one target")
        if len(members) == 1:
            out.append(replace(members[0], slide_id=case_id))
            continue
        labels = [m.instance_labels for m in members]
        out.append(E2ECase(case_id, members[0].target, np.concatenate([m.coords for m in members]),
                           main_grid=members[0].main_grid, low_grid=members[0].low_grid,
                           instance_labels=None if any(v is None for v in labels) else np.concatenate(labels),
                           parts=list(members)))
    return out


def slides_from_manifest(
    manifest: pd.DataFrame,
    target_column: str | Sequence[str] = "label",
    main_mpp: float = 2.0,
    patch_size: int = 32,
    low_factor: int = 2,
    load_banks: bool = True,
    min_tissue: float = 0.5,
    progress: bool = True,
) -> list[E2ESlide]:
    """Tile every manifest row at two scales (``cached_multiscale_grid``: tiled once per slide file and parameters,
    then read from ``cache_root()/grids/``) and, with ``load_banks``, load the (cached) patch banks.

    ``target_column``: a column name, or ``("survival_months", "event")`` for survival targets. Slides that fail to
    open or tile are skipped with a warning (the returned list says which were kept).
    """
    from tqdm.auto import tqdm

    from milstudy.data.patches import extract_patch_bank
    from milstudy.data.tiling import cached_multiscale_grid

    out: list[E2ESlide] = []
    rows = list(manifest.itertuples(index=False))
    for row in tqdm(rows, desc="tiling + patch banks", disable=not progress):
        row_d = row._asdict()
        if isinstance(target_column, str):
            target = row_d[target_column]
        else:
            target = tuple(row_d[c] for c in target_column)
        try:
            grids = cached_multiscale_grid(row_d["path"], main_mpp, patch_size, low_factor, min_tissue,
                                           slide_id=row_d["slide_id"])
            if grids.main.is_empty:
                log.warning("slide %s: no tissue patches at %.2f um/px; skipped", row_d["slide_id"], main_mpp)
                continue
            main = extract_patch_bank(row_d["path"], grids.main) if load_banks else None
            low = extract_patch_bank(row_d["path"], grids.low) if load_banks and not grids.low.is_empty else None
        except Exception as error:  # noqa: BLE001
            log.warning("slide %s (%s) skipped: %s", row_d["slide_id"], row_d["path"], error)
            continue
        out.append(E2ESlide(row_d["slide_id"], target, grids.main.coords, main, low, str(row_d["path"]),
                            grids.main, grids.low if not grids.low.is_empty else None))
    return out


def toy_slides(n_slides: int, n_patches: int = 24, size: int = 16, seed: int = 0, n_low: int = 8,
               witness_rate: float = 0.25, contrast: float = 1.0) -> list[E2ESlide]:
    """A hand-built in-memory cohort for tests and benchmarks: grey-noise patches, label 1 on odd slides, whose
    ``witness_rate`` share of main-scale patches (at least one) is red (``instance_labels`` = 1); ``contrast`` < 1
    blends the red with the grey noise (0 = invisible). No slide files involved."""
    if not 0.0 <= contrast <= 1.0 or not 0.0 < witness_rate <= 1.0:
        raise ValueError(f"toy_slides: contrast must be in [0, 1] and witness_rate in (0, 1], got {contrast}, "
                         f"{witness_rate}")
    rng = np.random.default_rng(seed)
    out = []
    side = int(np.ceil(np.sqrt(n_patches)))
    coords = np.stack([np.arange(n_patches) % side, np.arange(n_patches) // side], 1) * 64
    low_side = int(np.ceil(np.sqrt(max(1, n_low))))
    low_coords = np.stack([np.arange(n_low) % low_side, np.arange(n_low) // low_side], 1) * 128
    for i in range(n_slides):
        label = i % 2
        main = rng.integers(90, 160, size=(n_patches, size, size, 3), dtype=np.uint8)
        low = rng.integers(90, 160, size=(n_low, size, size, 3), dtype=np.uint8)
        truth = np.zeros(n_patches, np.int64)
        if label:
            witness = rng.choice(n_patches, size=max(1, int(round(n_patches * witness_rate))), replace=False)
            red = np.array([230, 40, 40], np.float32)
            main[witness] = np.rint((1 - contrast) * main[witness] + contrast * red).astype(np.uint8)
            truth[witness] = 1
        out.append(E2ESlide(f"toy_{i:03d}", label, coords.copy(), main, low, instance_labels=truth,
                            low_coords=low_coords.copy()))
    return out


def split_slides(slides: Sequence[E2ESlide], splits: Mapping[str, str]) -> dict[str, list[E2ESlide]]:
    """Group slides by ``splits[slide_id]`` ("train" | "val" | "test"); slides without a split are left out."""
    out: dict[str, list[E2ESlide]] = {"train": [], "val": [], "test": []}
    for slide in slides:
        split = splits.get(slide.slide_id)
        if split in out:
            out[split].append(slide)
    return out


def _assign_splits(manifest: pd.DataFrame, spec: Mapping[str, Any], seed: int) -> pd.DataFrame:
    """The ``split`` column a run uses: ``fold: k`` takes column ``fold_k`` (train/test, e.g. the upstream survival
    folds) and carves a patient-level validation share ``val_fraction`` (default 0.125, spec pitfall 4: never select
    on test) out of its train cases; without a split column, a patient-level 70/15/15 split."""
    from milstudy.data.manifests import patient_split

    stratify = spec.get("stratify") or next((c for c in ("label", "event") if c in manifest.columns), None)
    if spec.get("fold") is not None:
        column = f"fold_{int(spec['fold'])}"
        if column not in manifest.columns:
            folds = sorted(c for c in manifest.columns if c.startswith("fold_"))
            raise ValueError(f"data.fold={spec['fold']}: the manifest has no column {column!r} (folds: {folds})")
        manifest = manifest.assign(split=manifest[column].astype(str))
        val_fraction = float(spec.get("val_fraction", 0.125))
        if val_fraction > 0 and not (manifest["split"] == "val").any():
            train = manifest[manifest["split"] == "train"]
            carved = patient_split(train, val=val_fraction, test=0.0, stratify=stratify, seed=seed)
            manifest.loc[carved.index, "split"] = carved["split"].astype(str)
        return manifest
    if "split" not in manifest.columns:
        return patient_split(manifest, stratify=stratify, seed=seed)
    return manifest


def load_data(spec: Mapping[str, Any], seed: int = 0, load_banks: bool = True) -> tuple[dict[str, list[E2ESlide]], "Task"]:
    """Slides per split and the task from a run file's data section.

    ``spec`` keys: ``toy: {n_slides: 8, ...}`` (in-memory toy cohort) | ``cohort: {profile: smoke}`` (synthetic
    cohort from ``milstudy.data.synthetic.cohort_for_profile``) | ``manifest: path`` + ``slide_root``; plus
    ``task`` (see ``build_task``), ``main_mpp``, ``patch_size``, ``low_factor``, ``target`` (column name, or
    ``[survival_months, event]``), ``by_case`` (one bag per ``case_id``, see :func:`cases_from_slides`) and
    ``fold`` / ``val_fraction`` (see :func:`_assign_splits`).
    """
    from milstudy.train.tasks import build_task

    task_spec = spec.get("task")
    if "toy" in spec:
        slides = toy_slides(**spec["toy"])
        n = len(slides)
        n_val = max(2, n // 5)
        splits = {s.slide_id: ("val" if i >= n - n_val else "train") for i, s in enumerate(slides)}
        return split_slides(slides, splits), build_task(task_spec, [s.target for s in slides])
    if "cohort" in spec:
        from milstudy.data.synthetic import cohort_for_profile

        cohort = cohort_for_profile(**{"seed": seed, **spec["cohort"]})
        manifest = cohort.manifest
    elif "manifest" in spec:
        from milstudy.data.manifests import load_manifest

        manifest = load_manifest(spec["manifest"], slide_root=spec.get("slide_root"))
    else:
        raise ValueError("data spec needs one of 'toy', 'cohort' or 'manifest' (with 'slide_root')")
    manifest = _assign_splits(manifest, spec, seed)
    target = spec.get("target", "label")
    slides = slides_from_manifest(manifest, target if isinstance(target, str) else tuple(target),
                                  float(spec.get("main_mpp", 2.0)), int(spec.get("patch_size", 32)),
                                  int(spec.get("low_factor", 2)), load_banks=load_banks)
    if not slides:
        source = spec.get("manifest", "the cohort")
        raise ValueError(f"{source}: none of its {len(manifest)} slides could be opened and tiled (slide root "
                         f"{spec.get('slide_root')}); `milstudy data check --manifest M --slide-root R` lists why")
    splits = dict(zip(manifest["slide_id"].astype(str), manifest["split"].astype(str)))
    if spec.get("by_case"):  # one bag per case; manifests are validated to keep a case in one split
        case_of = dict(zip(manifest["slide_id"].astype(str), manifest["case_id"].astype(str)))
        splits = {case_of[sid]: split for sid, split in splits.items()}
        slides = cases_from_slides(slides, case_of)
    out = split_slides(slides, splits)
    if "oversample" in manifest.columns:
        out["train"] = oversample_rows(out["train"], manifest, by_case=bool(spec.get("by_case")))
    source = spec.get("manifest", "the cohort manifest")
    where = {str(sid): f"{source} line {line + 2} (slide {sid})" for line, sid in enumerate(manifest["slide_id"])}
    if spec.get("by_case"):
        where.update({str(c): f"{source} (case {c})" for c in manifest["case_id"]})
    return out, build_task(task_spec, [s.target for s in slides], [where.get(s.slide_id, s.slide_id) for s in slides])


def oversample_rows(train: Sequence[E2ESlide], manifest: pd.DataFrame, by_case: bool = False) -> list[E2ESlide]:
    """Each training slide (or case) repeated ``oversample`` times, as upstream duplicates manifest rows before
    training (TCGA-BRCA subtyping: ILC x2, specs/abmilx.md §2.6). The copies draw their own instance samples
    (sampling is seeded by the position in the list). A case takes the largest count of its slides."""
    key = "case_id" if by_case else "slide_id"
    counts = manifest.groupby(manifest[key].astype(str))["oversample"].max()
    bad = counts[~counts.apply(lambda v: float(v).is_integer() and v >= 1)]
    if len(bad):
        raise ValueError(f"manifest column 'oversample' must hold integers >= 1; {key} {bad.index[0]!r} has "
                         f"{bad.iloc[0]!r}")
    return [slide for slide in train for _ in range(int(counts.get(slide.slide_id, 1)))]
