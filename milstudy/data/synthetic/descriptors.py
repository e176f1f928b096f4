"""The S-vec world: slides of raw patch descriptors with instance ground truth (specs/abmilx.md §4.1 "S-vec tier";
asmil.md §4.1), built hard enough that the ABMILX mechanisms can show or visibly fail to (issue 15).

Each slide is an irregular tissue grid (an ellipse with holes) of 500-4,000 main-scale patches; every patch is a
descriptor ``x = mu_tissue + cue + stain + eps`` with ``eps ~ N(0, I_dim)``:

- **tissue**: K benign tissue types in spatially coherent regions (nearest of a few region centres), means
  ``tissue_sep * q_k`` on orthonormal directions; the mixture differs from slide to slide.
- **tumour** (witness) patches in 1-3 foci covering a per-slide share ``w`` (log-uniform in ``witness_rate``) of the
  tissue: a *shared* cue ``shared * u_shared`` plus a *specific* cue ``signal * r_i * u_tumour``, where the sign
  ``r_i`` is -1 with probability ``sign_flip`` (0: a linear cue; 0.5: it averages out under linear pooling and only
  an encoder that learns a nonlinear feature, |x . u_tumour|, sees it). With ``signal`` about 1 noise sd, one patch
  does not decide: the cue is spread over the extent of the foci.
- **mimics**: benign blobs on every slide (share in ``mimic_rate``) with the same shared cue and a specific cue of
  the same strength on ``mimic_overlap * u_tumour + sqrt(1 - mimic_overlap^2) * u_mimic``: they share part of the
  tumour cue, so a detector that has not learnt ``u_mimic`` fires on them (what pulls attention away from tumour,
  and what confounds mean pooling).
- **stain**: a slide-level offset ``N(0, stain_sd^2 I)`` added to every patch of the slide (both scales): it moves
  a slide's mean descriptor as much as a small tumour does (what mean pooling cannot undo), but not the patches'
  ranking within the slide (what attention uses).
- **low scale** (MRIS, spec §2.2): one low-scale patch per 2 x 2 cell of main patches (level-0 coordinates x 2),
  descriptor ``mu_tissue(majority) + tumour cues at half strength + arch + stain + eps``. For subtyping and survival,
  ``arch = subtype_low * (+-1 by subtype) * u_arch`` on low-scale tumour cells only (the architecture cue, which only
  the low scale sees); main-scale tumour patches carry the subtype only weakly (``subtype_main``).

Tasks: ``detection`` (label = any tumour, half the slides), ``subtyping`` (all slides tumour, subtypes in
``class_shares``, default 4:1 as BRCA IDC:ILC), ``grading`` (PANDA-like ISUP 0-5 from primary / secondary Gleason
patterns 3/4/5, each pattern with its own signed cue; grade 0 = no tumour) and ``survival`` (subtyping slides with
``T ~ Exp(lambda0 exp(beta * burden + gamma * subtype))``, burden = w / max w, uniform censoring at
``censoring_rate``). ``descriptor_cohort(world)`` returns ``E2ESlide`` per split (float32 ``main`` / ``low``
descriptors, coordinates, ``instance_labels``) and a per-slide table; the generator is deterministic in ``seed``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from milstudy.data.synthetic.cohort import calibrate_uniform_censoring

TASKS = ("detection", "subtyping", "grading", "survival")
PATCH_PX = 256  # level-0 pixels per main-scale patch (the coordinates' unit); the low scale covers 2 x 2 of them
# ISUP grade group from (primary, secondary) Gleason pattern (Epstein 2016): 3+3 -> 1, 3+4 -> 2, 4+3 -> 3,
# 4+4 / 3+5 / 5+3 -> 4, 4+5 / 5+4 / 5+5 -> 5.
ISUP = {(3, 3): 1, (3, 4): 2, (4, 3): 3, (4, 4): 4, (3, 5): 4, (5, 3): 4, (4, 5): 5, (5, 4): 5, (5, 5): 5}


@dataclass(frozen=True)
class DescriptorWorld:
    """The knobs of one S-vec cohort (see the module docstring); ``seed`` draws the cohort, nothing else."""

    task: str = "detection"
    n_slides: int = 200
    n_patches: tuple[int, int] = (500, 4000)
    dim: int = 32
    witness_rate: tuple[float, float] = (0.02, 0.3)
    signal: float = 2.0
    sign_flip: float = 0.0
    shared: float = 0.75
    mimic_overlap: float = 0.5
    mimic_rate: tuple[float, float] = (0.0, 0.15)
    stain_sd: float = 0.15
    n_tissue_types: int = 4
    tissue_sep: float = 1.5
    foci: tuple[int, int] = (1, 3)
    subtype_main: float = 0.2
    subtype_low: float = 1.5
    class_shares: tuple[float, ...] = (0.8, 0.2)
    survival_lambda0: float = 0.05
    survival_beta: float = 1.5
    survival_gamma: float = 0.8
    censoring_rate: float = 0.5
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if not 1 <= self.n_patches[0] <= self.n_patches[1]:
            problems.append(f"n_patches must be (min, max) with 1 <= min <= max, got {self.n_patches}")
        if not 0 < self.witness_rate[0] <= self.witness_rate[1] < 1:
            problems.append(f"witness_rate must be (min, max) in (0, 1), got {self.witness_rate}")
        if not 0 <= self.mimic_rate[0] <= self.mimic_rate[1] < 1 or self.witness_rate[1] + self.mimic_rate[1] >= 1:
            problems.append(f"mimic_rate must be (min, max) in [0, 1) leaving room for tumour, got {self.mimic_rate}")
        if self.dim < self.n_tissue_types + 8:
            problems.append(f"dim must be >= n_tissue_types + 8 (one direction per cue), got {self.dim}")
        if not 0 <= self.mimic_overlap <= 1:
            problems.append(f"mimic_overlap must be in [0, 1], got {self.mimic_overlap}")
        if not 0 <= self.sign_flip <= 0.5:
            problems.append(f"sign_flip must be in [0, 0.5], got {self.sign_flip}")
        if min(self.signal, self.shared, self.stain_sd, self.subtype_main, self.subtype_low) < 0:
            problems.append("signal, shared, stain_sd, subtype_main and subtype_low must be >= 0")
        if abs(sum(self.fractions) - 1) > 1e-9 or min(self.fractions) <= 0:
            problems.append(f"fractions (train, val, test) must be positive and sum to 1, got {self.fractions}")
        if abs(sum(self.class_shares) - 1) > 1e-9 or len(self.class_shares) != 2:
            problems.append(f"class_shares must be two shares summing to 1, got {self.class_shares}")
        if not 0 <= self.censoring_rate < 1 or self.foci[0] < 1 or self.foci[1] < self.foci[0]:
            problems.append("censoring_rate must be in [0, 1) and foci (min, max) with 1 <= min <= max")
        if self.n_slides < 12:
            problems.append(f"n_slides must be >= 12 (every split needs both labels), got {self.n_slides}")
        if problems:
            raise ValueError("DescriptorWorld: " + "; ".join(problems))

    def digest(self) -> str:
        """A short hash of every knob (provenance: which world a result came from)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class DescriptorCohort:
    """Slides per split (``E2ESlide``), the task, the per-slide table and the world that drew them.

    ``patch_classes[slide_id]``: int ``[N]`` per main-scale patch, what a pathologist would call it: 0 benign
    tissue, 1 mimic, 2 tumour (grading: 2 / 3 / 4 = Gleason pattern 3 / 4 / 5), e.g. the labels an FM-like
    encoder is pre-trained on (:func:`patch_classes`)."""

    splits: dict[str, list]
    task: Any
    table: pd.DataFrame
    world: DescriptorWorld
    directions: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    patch_classes: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def positives(self, split: str) -> list:
        return [s for s in self.splits[split] if s.instance_labels is not None and s.instance_labels.sum() > 0]


# ---------------------------------------------------------------------------------------------------- geometry
def tissue_grid(n_target: int, rng: np.random.Generator) -> np.ndarray:
    """Integer grid cells ``[N, 2]`` (x, y) of an irregular tissue: a random ellipse with 0-3 holes, about
    ``n_target`` cells (at least ``max(1, n_target // 2)``)."""
    aspect = rng.uniform(0.5, 2.0)
    area = n_target * 1.25  # room for the holes
    a, b = np.sqrt(area * aspect / np.pi), np.sqrt(area / (aspect * np.pi))
    xs, ys = np.meshgrid(np.arange(-int(a) - 1, int(a) + 2), np.arange(-int(b) - 1, int(b) + 2))
    cells = np.stack([xs.ravel(), ys.ravel()], 1)
    inside = (cells[:, 0] / a) ** 2 + (cells[:, 1] / b) ** 2 <= 1.0
    for _ in range(int(rng.integers(0, 4))):
        centre = cells[inside][rng.integers(inside.sum())]
        radius = rng.uniform(0.1, 0.25) * min(a, b)
        inside &= np.hypot(*(cells - centre).T) > radius
    cells = cells[inside]
    if len(cells) > n_target:
        keep = np.argsort(np.hypot(cells[:, 0] / a, cells[:, 1] / b), kind="stable")[:n_target]
        cells = cells[np.sort(keep)]
    return (cells - cells.min(0)).astype(np.int64)


def tissue_regions(cells: np.ndarray, n_types: int, rng: np.random.Generator) -> np.ndarray:
    """Tissue type ``[N]`` of every cell: spatially coherent regions (the nearest of 3-7 random centres), each of a
    random type in ``0 .. n_types - 1``."""
    n_regions = int(rng.integers(3, 8))
    centres = cells[rng.choice(len(cells), size=min(n_regions, len(cells)), replace=False)]
    region = np.argmin(np.hypot(*(cells[:, None, :] - centres[None]).transpose(2, 0, 1)), axis=1)
    return rng.integers(0, n_types, size=len(centres))[region]


def grow_foci(cells: np.ndarray, n_cells: int, n_foci: int, free: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``[N]``: ``n_cells`` cells among ``free`` nearest to ``n_foci`` random centres (ragged borders)."""
    chosen = np.zeros(len(cells), bool)
    candidates = np.flatnonzero(free)
    if n_cells <= 0 or len(candidates) == 0:
        return chosen
    centres = cells[rng.choice(candidates, size=min(n_foci, len(candidates)), replace=False)]
    distance = np.min(np.hypot(*(cells[:, None, :] - centres[None]).transpose(2, 0, 1)), axis=1)
    distance = distance + rng.uniform(0, 1.5, len(cells))  # ragged borders
    distance[~free] = np.inf
    chosen[np.argsort(distance, kind="stable")[:min(n_cells, len(candidates))]] = True
    return chosen


# --------------------------------------------------------------------------------------------------- the world
def cue_directions(world: DescriptorWorld) -> dict[str, np.ndarray]:
    """Orthonormal cue directions of the world (drawn from its seed)."""
    rng = np.random.default_rng([world.seed, 7])
    basis, _ = np.linalg.qr(rng.normal(size=(world.dim, world.dim)))
    names = ["shared", "tumour", "mimic", "arch", "subtype", "g3", "g4", "g5"]
    out = {name: basis[:, i] for i, name in enumerate(names)}
    out["tissue"] = basis[:, len(names):len(names) + world.n_tissue_types].T
    return out


def _slide_plan(world: DescriptorWorld, cls: int, rng: np.random.Generator) -> dict[str, Any]:
    """What a slide of class ``cls`` holds: tumour share, mimic share, Gleason patterns, subtype."""
    lo, hi = np.log(world.witness_rate[0]), np.log(world.witness_rate[1])
    has_tumour = world.task != "detection" or cls == 1
    if world.task == "grading":
        has_tumour = cls > 0
    plan = {"witness_rate": float(np.exp(rng.uniform(lo, hi))) if has_tumour else 0.0,
            "mimic_rate": float(rng.uniform(*world.mimic_rate)), "subtype": -1, "patterns": ()}
    if world.task in ("subtyping", "survival"):
        plan["subtype"] = int(cls)
    if world.task == "grading" and cls > 0:
        options = [pair for pair, grade in ISUP.items() if grade == cls]
        plan["patterns"] = options[int(rng.integers(len(options)))]
        plan["primary_share"] = float(rng.uniform(0.55, 0.9)) if plan["patterns"][0] != plan["patterns"][1] else 1.0
    return plan


def _build_slide(world: DescriptorWorld, plan: dict[str, Any], dirs: dict[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, Any]:
    n_target = int(rng.integers(world.n_patches[0], world.n_patches[1] + 1))
    cells = tissue_grid(n_target, rng)
    n = len(cells)
    tissue = tissue_regions(cells, world.n_tissue_types, rng)
    tumour = grow_foci(cells, int(round(plan["witness_rate"] * n)), int(rng.integers(world.foci[0], world.foci[1] + 1)),
                       np.ones(n, bool), rng)
    if plan["witness_rate"] > 0 and not tumour.any():
        tumour[rng.integers(n)] = True
    mimic = grow_foci(cells, int(round(plan["mimic_rate"] * n)), int(rng.integers(1, 3)), ~tumour, rng)
    pattern = np.zeros(n, np.int64)  # Gleason pattern per tumour patch (grading), 0 elsewhere
    if plan["patterns"]:
        primary, secondary = plan["patterns"]
        pattern[tumour] = primary
        idx = np.flatnonzero(tumour)
        n_secondary = int(round((1 - plan["primary_share"]) * len(idx)))
        if n_secondary and secondary != primary:  # the secondary pattern as its own focus inside the tumour
            far = grow_foci(cells, n_secondary, 1, tumour, rng)
            pattern[far] = secondary
    stain = rng.normal(0, world.stain_sd, world.dim)
    sub_sign = 0.0 if plan["subtype"] < 0 else (1.0 if plan["subtype"] == 1 else -1.0)

    def cues(is_tumour, is_mimic, patterns, strength, k):
        signs = np.where(rng.uniform(size=(k, 1)) < world.sign_flip, -1.0, 1.0)
        out = np.zeros((k, world.dim))
        out += (is_tumour | is_mimic)[:, None] * world.shared * strength * dirs["shared"]
        mimic_dir = world.mimic_overlap * dirs["tumour"] + np.sqrt(1 - world.mimic_overlap ** 2) * dirs["mimic"]
        out += is_mimic[:, None] * signs * world.signal * strength * mimic_dir
        specific = dirs["tumour"][None] if not plan["patterns"] else np.stack(
            [dirs.get(f"g{p}", np.zeros(world.dim)) for p in patterns])
        out += is_tumour[:, None] * signs * world.signal * strength * specific
        return out

    main = world.tissue_sep * dirs["tissue"][tissue] + cues(tumour, mimic, pattern, 1.0, n)
    main += tumour[:, None] * sub_sign * world.subtype_main * dirs["subtype"]
    main += stain + rng.normal(size=(n, world.dim))
    # low scale: one patch per 2 x 2 cell; majority tissue, tumour if >= half of its main patches are
    cell_low = cells // 2
    low_cells, inverse = np.unique(cell_low, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    m = len(low_cells)
    tumour_share = np.bincount(inverse, weights=tumour, minlength=m) / np.bincount(inverse, minlength=m)
    mimic_share = np.bincount(inverse, weights=mimic, minlength=m) / np.bincount(inverse, minlength=m)
    low_tissue = np.zeros(m, np.int64)
    np.maximum.at(low_tissue, inverse, tissue)  # a deterministic representative of the cell's tissue
    low_tumour, low_mimic = tumour_share >= 0.5, (mimic_share >= 0.5) & (tumour_share < 0.5)
    low_pattern = np.zeros(m, np.int64)
    np.maximum.at(low_pattern, inverse, pattern)
    low = world.tissue_sep * dirs["tissue"][low_tissue] + cues(low_tumour, low_mimic, low_pattern, 0.5, m)
    low += low_tumour[:, None] * sub_sign * world.subtype_low * dirs["arch"]
    low += stain + rng.normal(size=(m, world.dim))
    return {"coords": cells * PATCH_PX, "low_coords": low_cells * 2 * PATCH_PX, "main": main.astype(np.float32),
            "low": low.astype(np.float32), "instance_labels": tumour.astype(np.int64), "pattern": pattern,
            "mimic": mimic, "witness_share": float(tumour.mean()), "mimic_share": float(mimic.mean())}


def patch_classes(pattern: np.ndarray, mimic: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """Per-patch class: 0 benign, 1 mimic, 2 tumour; a Gleason pattern p (grading) gives class p - 1 (2, 3, 4)."""
    classes = np.where(mimic, 1, 0).astype(np.int64)
    classes[tumour] = np.where(pattern[tumour] > 0, pattern[tumour] - 1, 2)
    return classes


def _classes(world: DescriptorWorld, rng: np.random.Generator) -> np.ndarray:
    """Per-slide class, exact proportions, shuffled."""
    n = world.n_slides
    if world.task == "detection":
        counts = [n - n // 2, n // 2]
    elif world.task == "grading":
        counts = [n // 6 + (i < n % 6) for i in range(6)]
    else:
        counts = [int(round(world.class_shares[0] * n))]
        counts.append(n - counts[0])
    labels = np.repeat(np.arange(len(counts)), counts)
    return labels[rng.permutation(n)]


def _splits(labels: np.ndarray, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Stratified train / val / test assignment (every split gets every label that has >= 3 slides)."""
    split = np.empty(len(labels), dtype=object)
    for value in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == value))
        n_val = max(1, int(round(fractions[1] * len(idx))))
        n_test = max(1, int(round(fractions[2] * len(idx))))
        split[idx[:n_val]], split[idx[n_val:n_val + n_test]], split[idx[n_val + n_test:]] = "val", "test", "train"
    return split


def descriptor_cohort(world: DescriptorWorld, slide_seed: int | None = None) -> DescriptorCohort:
    """Draw the cohort of ``world``: ``E2ESlide`` per split with float32 descriptors (see the module docstring).

    ``slide_seed`` (default ``world.seed``) draws the slides; the cue directions (what a tumour, a mimic, a tissue
    type look like) always come from ``world.seed``. Another ``slide_seed`` gives disjoint slides of the same
    biology, e.g. the cohort an FM-like encoder is pre-trained on (slide ids name the slide seed)."""
    from milstudy.data.e2e_slides import E2ESlide
    from milstudy.train.tasks import build_task

    slide_seed = world.seed if slide_seed is None else int(slide_seed)
    rng = np.random.default_rng([slide_seed, 1])
    dirs = cue_directions(world)
    labels = _classes(world, rng)
    splits = _splits(labels, world.fractions, rng)
    rows, slides = [], []
    for i, cls in enumerate(labels):
        slide_rng = np.random.default_rng([slide_seed, 2, i])
        plan = _slide_plan(world, int(cls), slide_rng)
        built = _build_slide(world, plan, dirs, slide_rng)
        rows.append({"slide_id": f"svec_{world.task}_{slide_seed}_{i:04d}", "label": int(cls), "split": splits[i],
                     "n_patches": len(built["coords"]), "n_low": len(built["low"]),
                     "witness_rate": built["witness_share"], "mimic_rate": built["mimic_share"],
                     "subtype": plan["subtype"], "patterns": "+".join(map(str, plan["patterns"])),
                     "survival_unit_exp": slide_rng.exponential(), "censor_u": slide_rng.uniform()})
        slides.append(built)
    table = pd.DataFrame(rows)
    if world.task == "survival":
        burden = table["witness_rate"].to_numpy() / max(world.witness_rate[1], 1e-12)
        hazard = world.survival_lambda0 * np.exp(world.survival_beta * np.minimum(burden, 1.0)
                                                 + world.survival_gamma * table["subtype"].to_numpy())
        times, events = calibrate_uniform_censoring(table["survival_unit_exp"].to_numpy() / hazard,
                                                    table["censor_u"].to_numpy(), world.censoring_rate)
        table["time"], table["event"] = times, events
        targets = list(zip(times.tolist(), events.tolist()))
        task = build_task({"type": "survival"}, targets)
    else:
        targets = table["label"].tolist()
        spec = {"type": "grading", "n_grades": 6} if world.task == "grading" else {"type": "classification"}
        task = build_task(spec, targets)
    table = table.drop(columns=["survival_unit_exp", "censor_u"])
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    classes = {}
    for row, built, target in zip(rows, slides, targets):
        classes[row["slide_id"]] = patch_classes(built["pattern"], built["mimic"], built["instance_labels"] > 0)
        slide = E2ESlide(row["slide_id"], target, built["coords"], built["main"], built["low"],
                         instance_labels=built["instance_labels"], low_coords=built["low_coords"])
        out[row["split"]].append(slide)
    return DescriptorCohort(out, task, table, world, dirs, classes)
