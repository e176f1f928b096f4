"""Synthetic cohorts: many rendered slides written as real pyramidal TIFFs, their tumour masks, one manifest.

One generator serves every paper's CPU profile through a ``task`` field (each slide carries every target that
makes sense, so a cohort built for one task can still be used for another):

* ``detection`` (CAMELYON-like, "lymph node"): negative slides have no tumour; positives 1-3 foci.
* ``subtyping`` (BRCA-like IDC vs ILC, ≈ 4:1): all slides have tumour; the subtype sets the low-magnification
  architecture (glands / cohesive clusters vs single-file cords).
* ``grading`` (PANDA-like ISUP 0-5, "prostate"): primary + secondary Gleason-like patterns (3 glands,
  4 fused clusters, 5 single files, more nuclear atypia with the pattern); grade 0 has no tumour.
* ``survival``: as subtyping, plus T ~ Exp(λ0 exp(β·burden + γ·subtype + δ·grade/5)) with uniform censoring
  calibrated to ``censoring_rate`` (30-80 %); ``label`` = 4 quantile bins of the event times (as upstream).
* Every slide gets a templated report (``report_missing_rate`` of them empty), for slide-report pairs.

Sizes (documented choice). Level 0 is 0.5 µm/px. The E2E trainer's main scale is 32-px patches at 2.0 µm/px
(level 2, 128 level-0 px) and its low scale 32 px at 4.0 µm/px (level 3, 2x field of view). The ``cpu`` profile's
slides are 3072-4608 px a side with ≈ 40 % tissue, i.e. about 230-520 (mean ≈ 360) main-scale tissue patches
per slide; ``smoke`` slides are 1024 px (≈ 25 patches). The ground-truth label map is stored at 8 level-0 px per
pixel (a 128-px patch covers 16 x 16 mask pixels), so per-patch tumour fractions are exact for such grids.

Cohorts are deterministic by seed (slide ``i`` uses ``SeedSequence([seed, i])``; labels and splits use a
cohort-level stream), generated once into ``cache_root()/cohorts/<name>-<config hash>/`` and reused: each slide
is written atomically with a JSON sidecar, the manifest and then a ``COMPLETE`` marker are written last, and a
half-built cohort is resumed from its finished slides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from milstudy.data.synthetic.ground_truth import TUMOUR_LABEL, _read_label_map, instance_labels, read_tumour_mask  # noqa: F401
from milstudy.data.synthetic.renderer import FocusSpec, render_slide
from milstudy.data.synthetic.reports import make_report

__all__ = [
    "Cohort",
    "SyntheticCohortConfig",
    "TASKS",
    "build_cohort",
    "cohort_for_profile",
    "instance_labels",
    "load_cohort",
]

GENERATOR_VERSION = 1
TASKS = ("detection", "subtyping", "grading", "survival")
PANDA_GRADE_SHARES = (2724, 2602, 1321, 1205, 1187, 1163)  # specs/abmilx.md §5.1
_ORGAN = {"detection": "lymph node", "subtyping": "breast", "survival": "breast", "grading": "prostate"}
_GRADE_PATTERNS = {1: [(3, 3)], 2: [(3, 4)], 3: [(4, 3)], 4: [(4, 4), (3, 5), (5, 3)], 5: [(4, 5), (5, 4), (5, 5)]}
_PATTERN_ARCH = {3: "glands", 4: "clusters", 5: "single_file"}


@dataclass(frozen=True)
class SyntheticCohortConfig:
    """Every knob of a synthetic cohort; the cache folder is keyed by a hash of these values."""

    task: str = "detection"
    n_slides: int = 150
    seed: int = 0
    name: str = ""  # defaults to the task
    size_range: tuple[int, int] = (3072, 4608)  # level-0 px, width and height drawn independently
    mpp: float = 0.5  # µm per level-0 px
    mask_downsample: int = 8  # level-0 px per ground-truth mask px (multiple of 4)
    witness_rate_range: tuple[float, float] = (0.005, 0.30)  # tumour share of tissue, log-uniform
    signal_strength: float = 1.0  # high-magnification nuclear cue (0 = none)
    architecture_strength: float = 0.8  # share of tumour nuclei laid out by the low-magnification architecture
    n_foci_range: tuple[int, int] = (1, 3)
    large_and_tiny_rate: float = 0.25  # share of multi-focal slides with one large and one tiny focus
    positive_fraction: float = 0.5  # detection
    major_subtype_fraction: float = 0.8  # subtyping / survival: IDC-like share (≈ 4:1)
    grade_shares: tuple[float, ...] = PANDA_GRADE_SHARES
    survival_lambda0: float = 1 / 40.0  # per month
    survival_beta: float = 2.5  # burden (witness rate / max witness rate)
    survival_gamma: float = 0.8  # subtype 1 vs 0
    survival_delta: float = 1.0  # grade / 5
    censoring_rate: float = 0.5  # target share of censored slides, in [0.3, 0.8]
    report_missing_rate: float = 0.3
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    compression: str = "jpeg"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.n_slides < 1:
            raise ValueError(f"n_slides must be >= 1, got {self.n_slides}")
        lo, hi = self.witness_rate_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"witness_rate_range must satisfy 0 < lo <= hi < 1, got {self.witness_rate_range}")
        if not 0.0 <= self.censoring_rate < 1.0:
            raise ValueError(f"censoring_rate must be in [0, 1), got {self.censoring_rate}")
        if self.mask_downsample % 4:
            raise ValueError(f"mask_downsample must be a multiple of 4, got {self.mask_downsample}")
        if min(self.size_range) < 256:
            raise ValueError(f"size_range must be >= 256 px, got {self.size_range}")

    @property
    def cohort_name(self) -> str:
        return self.name or self.task

    def digest(self) -> str:
        payload = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha1(payload.encode()).hexdigest()[:10]


@dataclass
class Cohort:
    """A built cohort: ``root`` folder, ``manifest`` (absolute ``path`` / ``mask_path``), ``config``."""

    root: Path
    manifest: pd.DataFrame
    config: SyntheticCohortConfig | None = None
    manifest_path: Path | None = None

    def slide_path(self, row: pd.Series | int | str) -> Path:
        row = self._row(row)
        path = Path(row["path"])
        return path if path.is_absolute() else self.root / path

    def label_map(self, row: pd.Series | int | str) -> np.ndarray:
        """uint8 ``[h, w]`` ground truth at ``mask_downsample``: 0 glass, 1 normal tissue, 2+k tumour focus k."""
        row = self._row(row)
        path = Path(row["mask_path"])
        return _read_label_map(path if path.is_absolute() else self.root / path)

    def mask(self, row: pd.Series | int | str) -> np.ndarray:
        """bool ``[h, w]`` tumour mask at ``mask_downsample`` level-0 px per pixel."""
        return self.label_map(row) >= TUMOUR_LABEL

    def _row(self, row: pd.Series | int | str) -> pd.Series:
        if isinstance(row, pd.Series):
            return row
        if isinstance(row, str):
            hit = self.manifest[self.manifest["slide_id"] == row]
            if hit.empty:
                raise KeyError(f"slide {row!r} is not in the cohort at {self.root}")
            return hit.iloc[0]
        return self.manifest.iloc[int(row)]


# -------------------------------------------------------------------------------------------------------------
# Latent attributes (cheap, decided before rendering)
# -------------------------------------------------------------------------------------------------------------


def _exact_counts(shares: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder allocation of ``n`` items to ``shares``."""
    shares = np.asarray(shares, np.float64) / np.sum(shares)
    raw = shares * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def _cohort_classes(config: SyntheticCohortConfig) -> np.ndarray:
    """The per-slide class (exact proportions, shuffled by the cohort stream)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7_777_777]))
    n = config.n_slides
    if config.task == "detection":
        counts = _exact_counts(np.array([1 - config.positive_fraction, config.positive_fraction]), n)
    elif config.task == "grading":
        counts = _exact_counts(np.array(config.grade_shares), n)
    else:
        counts = _exact_counts(np.array([config.major_subtype_fraction, 1 - config.major_subtype_fraction]), n)
    classes = np.repeat(np.arange(len(counts)), counts)
    return rng.permutation(classes)


def _slide_plan(config: SyntheticCohortConfig, index: int, cls: int) -> dict:
    """Latent attributes and render parameters of slide ``index`` (deterministic in (seed, index, class))."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, index]))
    lo, hi = config.size_range
    unit = 32
    width = int(rng.integers(lo // unit, hi // unit + 1)) * unit
    height = int(rng.integers(lo // unit, hi // unit + 1)) * unit
    task = config.task
    has_tumour, subtype, grade, patterns = True, -1, -1, (0, 0)
    if task == "detection":
        has_tumour = bool(cls == 1)
        subtype = int(rng.uniform() > config.major_subtype_fraction) if has_tumour else -1
    elif task in ("subtyping", "survival"):
        subtype = int(cls)
    elif task == "grading":
        grade = int(cls)
        has_tumour = grade > 0
        if has_tumour:
            options = _GRADE_PATTERNS[grade]
            patterns = options[int(rng.integers(len(options)))]
    foci: list[dict] = []
    witness = 0.0
    if has_tumour:
        wlo, whi = config.witness_rate_range
        witness = float(np.exp(rng.uniform(np.log(wlo), np.log(whi))))
        n_min, n_max = config.n_foci_range
        n_foci = int(rng.integers(n_min, n_max + 1))
        if task == "grading" and patterns[0] != patterns[1]:
            n_foci = max(n_foci, 2)
        if n_foci >= 2 and rng.uniform() < config.large_and_tiny_rate:
            shares = np.array([0.88] + [0.1 / max(1, n_foci - 2)] * (n_foci - 2) + [0.02])
            shares = shares / shares.sum()
        else:
            shares = rng.dirichlet(np.full(n_foci, 2.0))
        if task == "grading" and patterns[0] != patterns[1]:
            shares = np.sort(shares)[::-1]
            primary_share = rng.uniform(0.6, 0.8)
            shares = np.concatenate([[primary_share], shares[1:] / shares[1:].sum() * (1 - primary_share)])
        for k, share in enumerate(shares):
            if task == "grading":
                pattern = patterns[0] if k == 0 or patterns[0] == patterns[1] else patterns[1]
                arch, atypia = _PATTERN_ARCH[pattern], (pattern - 3) / 2
            else:
                arch = "single_file" if subtype == 1 else ("glands", "clusters")[int(rng.integers(2))]
                atypia = float(rng.uniform(0.2, 0.8))
            foci.append({"area_fraction": float(witness * share), "architecture": arch, "atypia": atypia})
    return {
        "index": index,
        "width": width,
        "height": height,
        "has_tumour": has_tumour,
        "subtype": subtype,
        "grade": grade,  # -1 = not applicable (written as empty)
        "primary_pattern": int(patterns[0]),
        "secondary_pattern": int(patterns[1]),
        "target_witness_rate": witness,
        "foci": foci,
        "render_seed": int(rng.integers(2**63 - 1)),
        "report_seed": int(rng.integers(2**63 - 1)),
        "survival_unit_exp": float(rng.exponential(1.0)),
        "censor_u": float(rng.uniform()),
        "report_missing": bool(rng.uniform() < config.report_missing_rate),
    }


def _slide_id(config: SyntheticCohortConfig, index: int) -> str:
    return f"syn-{config.task[:4]}-{index:04d}"


# -------------------------------------------------------------------------------------------------------------
# Building one slide (runs in worker processes)
# -------------------------------------------------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _build_slide(root: str, config: SyntheticCohortConfig, plan: dict) -> dict:
    from milstudy.data.slides import write_pyramidal_tiff

    root_p = Path(root)
    slide_id = _slide_id(config, plan["index"])
    sidecar = root_p / "meta" / f"{slide_id}.json"
    slide_rel, mask_rel = f"slides/{slide_id}.tiff", f"masks/{slide_id}.png"
    if sidecar.exists() and (root_p / slide_rel).exists() and (root_p / mask_rel).exists():
        return json.loads(sidecar.read_text())
    rng = np.random.default_rng(plan["render_seed"])
    foci = [FocusSpec(**f) for f in plan["foci"]]
    image, label_map = render_slide(
        plan["width"],
        plan["height"],
        rng,
        foci,
        signal_strength=config.signal_strength,
        architecture_strength=config.architecture_strength,
        mask_downsample=config.mask_downsample,
    )
    write_pyramidal_tiff(root_p / slide_rel, image, config.mpp, compression=config.compression, min_levels=4)
    del image
    _write_png(root_p / mask_rel, label_map)

    tissue_px = int((label_map >= 1).sum())
    focus_px = np.bincount(label_map.ravel(), minlength=2 + len(foci))[2:]
    focus_px = focus_px[focus_px > 0]
    px_mm = config.mpp * config.mask_downsample / 1000.0
    witness = float(focus_px.sum() / tissue_px) if tissue_px else 0.0
    attrs = {
        "organ": _ORGAN[config.task],
        "has_tumour": bool(focus_px.size > 0),
        "subtype": plan["subtype"],
        "grade": plan["grade"],
        "primary_pattern": plan["primary_pattern"],
        "secondary_pattern": plan["secondary_pattern"],
        "witness_rate": witness,
        "n_foci": int(focus_px.size),
        "largest_focus_mm": float(np.sqrt(focus_px.max()) * px_mm) if focus_px.size else 0.0,
        "architectures": ",".join(f.architecture for f in foci),
    }
    report = "" if plan["report_missing"] else make_report(attrs, np.random.default_rng(plan["report_seed"]))
    row = {
        "slide_id": slide_id,
        "path": slide_rel,
        "mask_path": mask_rel,
        "mask_downsample": config.mask_downsample,
        "width": plan["width"],
        "height": plan["height"],
        "mpp": config.mpp,
        "tissue_fraction_true": tissue_px / label_map.size,
        "smallest_focus_fraction": float(focus_px.min() / tissue_px) if focus_px.size else 0.0,
        "largest_focus_fraction": float(focus_px.max() / tissue_px) if focus_px.size else 0.0,
        "report": report,
        **attrs,
    }
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")  # concurrent builders never share a temp
    tmp.write_text(json.dumps(row))
    os.replace(tmp, sidecar)
    return row


# -------------------------------------------------------------------------------------------------------------
# Cohort assembly
# -------------------------------------------------------------------------------------------------------------


def _survival(config: SyntheticCohortConfig, rows: list[dict], plans: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Survival months and events: exponential times, uniform censoring calibrated to ``censoring_rate``."""
    wmax = config.witness_rate_range[1]
    burden = np.array([min(1.0, r["witness_rate"] / wmax) for r in rows])
    subtype = np.array([max(0, r["subtype"]) for r in rows], np.float64)
    grade = np.array([max(0, r["grade"]) for r in rows], np.float64)
    hazard = config.survival_lambda0 * np.exp(
        config.survival_beta * burden + config.survival_gamma * subtype + config.survival_delta * grade / 5
    )
    times = np.array([p["survival_unit_exp"] for p in plans]) / hazard
    return calibrate_uniform_censoring(times, np.array([p["censor_u"] for p in plans]), config.censoring_rate)


def calibrate_uniform_censoring(times: np.ndarray, u: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Observed times and events under uniform censoring ``C = u * c_max`` with ``c_max`` chosen (bisection) so
    that about ``rate`` of the slides are censored; ``u`` are per-slide uniforms in [0, 1)."""
    if rate <= 0:
        return times, np.ones(len(times), int)
    lo, hi = 1e-6, 1e6  # the censored share decreases with c_max
    for _ in range(80):
        mid = np.sqrt(lo * hi)
        if np.mean(u * mid < times) > rate:
            lo = mid
        else:
            hi = mid
    censor = u * hi
    event = (times <= censor).astype(int)
    return np.minimum(times, censor), event


def _splits(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 8_888_888]))
    split = np.empty(len(labels), object)
    for value in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == value))
        counts = _exact_counts(np.asarray(fractions), len(idx))
        split[idx[: counts[0]]] = "train"
        split[idx[counts[0] : counts[0] + counts[1]]] = "val"
        split[idx[counts[0] + counts[1] :]] = "test"
    return split


def _assemble(config: SyntheticCohortConfig, rows: list[dict], plans: list[dict]) -> pd.DataFrame:
    months, event = _survival(config, rows, plans)
    frame = pd.DataFrame(rows)
    frame.insert(1, "case_id", [f"case-{config.task[:4]}-{p['index']:04d}" for p in plans])
    frame["survival_months"] = np.round(months, 3)
    frame["event"] = event
    frame["witness_rate"] = frame["witness_rate"].round(6)
    if config.task == "detection":
        label = frame["has_tumour"].astype(int).to_numpy()
    elif config.task == "grading":
        label = frame["grade"].to_numpy()
    elif config.task == "subtyping":
        label = frame["subtype"].to_numpy()
    else:  # survival: 4 bins at the quartiles of the observed event times (upstream `Label`)
        observed = months[event == 1] if event.sum() >= 4 else months
        edges = np.quantile(observed, [0.25, 0.5, 0.75])
        label = np.searchsorted(edges, months, side="right")
    frame["label"] = label.astype(int)
    frame["grade"] = frame["grade"].where(frame["grade"] >= 0).astype("Int64")
    frame["split"] = _splits(frame["label"].to_numpy(), config.split_fractions, config.seed)
    frame["task"] = config.task
    first = ["slide_id", "case_id", "path", "label", "grade", "survival_months", "event", "report", "split"]
    return frame[first + [c for c in frame.columns if c not in first]]


def _absolute(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    frame = frame.copy()
    for column in ("path", "mask_path"):
        frame[column] = [str(p if Path(p).is_absolute() else root / p) for p in frame[column]]
    frame["report"] = frame["report"].fillna("")
    return frame


def cohort_dir(config: SyntheticCohortConfig) -> Path:
    from milstudy.paths import cache_root

    return cache_root() / "cohorts" / f"{config.cohort_name}-{config.digest()}"


def load_cohort(root: str | os.PathLike) -> Cohort:
    """Open a finished cohort folder (``manifest.csv`` + ``COMPLETE``)."""
    root = Path(root)
    marker = root / "COMPLETE"
    if not marker.exists():
        raise FileNotFoundError(f"{root}: not a finished synthetic cohort (no COMPLETE marker); rebuild it")
    info = json.loads(marker.read_text())
    config = None
    if "config" in info:
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
        config = SyntheticCohortConfig(**cfg)
    frame = pd.read_csv(root / "manifest.csv", keep_default_na=False, na_values=[""])
    return Cohort(root=root, manifest=_absolute(frame, root), config=config, manifest_path=root / "manifest.csv")


def build_cohort(
    config: SyntheticCohortConfig,
    root: str | os.PathLike | None = None,
    *,
    n_workers: int | None = None,
    progress: bool = True,
) -> Cohort:
    """Build (or reuse) the cohort of ``config`` under ``root`` (default ``cache_root()/cohorts/<name>-<hash>``)."""
    root = Path(root) if root is not None else cohort_dir(config)
    if (root / "COMPLETE").exists():
        return load_cohort(root)
    for sub in ("slides", "masks", "meta"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    classes = _cohort_classes(config)
    plans = [_slide_plan(config, i, int(c)) for i, c in enumerate(classes)]
    if n_workers is None:
        n_workers = 1 if config.n_slides <= 4 or max(config.size_range) <= 1024 else min(2, os.cpu_count() or 1)
    rows: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plans), desc=f"cohort {config.cohort_name}", unit="slide")
    if n_workers <= 1:
        for plan in plans:
            rows[plan["index"]] = _build_slide(str(root), config, plan)
            bar.update(1) if bar else None
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_build_slide, str(root), config, plan): plan["index"] for plan in plans}
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                bar.update(1) if bar else None
    if bar:
        bar.close()
    ordered = [rows[p["index"]] for p in plans]
    frame = _assemble(config, ordered, plans)
    tmp = root / f".manifest.csv.{os.getpid()}.tmp"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, root / "manifest.csv")
    marker = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(config)}
    marker_tmp = root / f".COMPLETE.{os.getpid()}.tmp"
    marker_tmp.write_text(json.dumps(marker, indent=1, default=list))
    os.replace(marker_tmp, root / "COMPLETE")
    return load_cohort(root)


PROFILES = {
    "smoke": dict(n_slides=12, size_range=(1024, 1024), witness_rate_range=(0.05, 0.3)),
    "cpu": dict(n_slides=150, size_range=(3072, 4608)),
}


def cohort_for_profile(profile: str, task: str = "detection", seed: int = 0, **overrides) -> Cohort:
    """The default cohort of a run profile (``smoke``: 12 slides of 1024 px, seconds; ``cpu``: 150 slides of
    3072-4608 px, minutes on 2 cores). ``overrides`` change any :class:`SyntheticCohortConfig` field."""
    if profile not in PROFILES:
        raise ValueError(f"no synthetic cohort for profile {profile!r}; choose one of {sorted(PROFILES)} "
                         f"(the 'paper' profile uses real cohorts from data_manifests/)")
    params = {**PROFILES[profile], **overrides}
    if task == "grading" and profile == "smoke":
        params.setdefault("n_slides", 12)
    config = SyntheticCohortConfig(task=task, seed=seed, **params)
    return build_cohort(config, progress=True)
