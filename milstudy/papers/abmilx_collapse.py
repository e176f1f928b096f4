"""The ABMILX E2 collapse phase diagram runs (specs/abmilx.md §4.3 E2, synthetic profile; ours, not in the paper):
each aggregator trained end to end over witness rate w x patches per step s x seeds on an in-memory cohort with
instance ground truth: the S-vec detection world (:class:`SvecPhaseCohort`: calibrated, frozen knobs, slides of
500-4,000 descriptor patches with mimics; issue 15) or the image toy cohort (:class:`PhaseCohort`,
:func:`milstudy.data.e2e_slides.toy_slides`). The question and the summary (pure) are in
:mod:`milstudy.analysis.collapse`.
"""


from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from milstudy.analysis.collapse import summarize_collapse
from milstudy.analysis.risk import mass_on_tumour
from milstudy.analysis.sampling_noise import p_no_witness_without_replacement

if TYPE_CHECKING:
    from milstudy.train.e2e import E2EConfig

__all__ = ["PhaseCohort", "SvecPhaseCohort", "collapse_grid", "phase_splits", "summarize_collapse"]


@dataclass(frozen=True)
class PhaseCohort:
    """The toy cohort of one witness rate: ``n_slides`` (half positive) of ``n_patches`` patches of
    ``patch_size`` px; ``contrast`` of the red witness tint (1 = saturated red); ``fractions`` of train / val /
    test slides (consecutive, so every split keeps the label balance); ``seed`` fixes the data, not training."""

    n_slides: int = 48
    n_patches: int = 256
    patch_size: int = 16
    contrast: float = 0.25
    fractions: tuple[float, float, float] = (0.5, 0.17, 0.33)
    seed: int = 0


@dataclass(frozen=True)
class SvecPhaseCohort:
    """The frozen S-vec detection world (:func:`milstudy.papers.svec.calibrated_world`) with every positive slide
    at tumour share ``w``; ``n_slides`` and ``n_patches`` (per-slide range) are the study's design, ``seed`` the
    generator seed (never the calibration's)."""

    n_slides: int = 200
    n_patches: tuple[int, int] = (500, 4000)
    seed: int = 0


def phase_splits(witness_rate: float, cohort: PhaseCohort | SvecPhaseCohort) -> dict[str, list]:
    """Train / val / test lists of ``E2ESlide`` for one witness rate."""
    from milstudy.data.e2e_slides import toy_slides

    if isinstance(cohort, SvecPhaseCohort):
        from milstudy.data.synthetic.descriptors import descriptor_cohort
        from milstudy.papers.svec import calibrated_world

        world = calibrated_world("detection", seed=cohort.seed, n_slides=cohort.n_slides,
                                 n_patches=tuple(cohort.n_patches), witness_rate=(witness_rate, witness_rate))
        return descriptor_cohort(world).splits

    slides = toy_slides(cohort.n_slides, n_patches=cohort.n_patches, size=cohort.patch_size, seed=cohort.seed,
                        witness_rate=witness_rate, contrast=cohort.contrast)
    n_train = 2 * max(1, int(round(cohort.fractions[0] * cohort.n_slides / 2)))
    n_val = 2 * max(1, int(round(cohort.fractions[1] * cohort.n_slides / 2)))
    if n_train + n_val + 2 > cohort.n_slides:
        raise ValueError(f"PhaseCohort: {cohort.n_slides} slides leave no test slides after {n_train} train and "
                         f"{n_val} validation slides; use more slides")
    return {"train": slides[:n_train], "val": slides[n_train:n_train + n_val], "test": slides[n_train + n_val:]}


def _witness_mass(attention: Mapping[str, np.ndarray], slides: Sequence) -> float:
    """Mean over positive slides of the head-mean attention mass on tumour patches (NaN without attention)."""
    masses = [mass_on_tumour(attention[slide.slide_id], slide.instance_labels) for slide in slides
              if slide.instance_labels is not None and slide.instance_labels.any() and slide.slide_id in attention]
    return float(np.mean(masses)) if masses else float("nan")


def _collapse_run(job: dict, data: Mapping[str, list]) -> dict:
    """One (witness rate, s, aggregator, seed) run of ``collapse_grid``; in a worker process or in-line."""
    from milstudy.train.e2e import train_e2e
    from milstudy.train.tasks import ClassificationTask

    config = job["config"]
    start = time.perf_counter()
    result = train_e2e(data, ClassificationTask(2), config)
    auc = float(result.test_metrics["auc"])
    positives = [sl for sl in data["train"] if sl.target]
    return {
        "aggregator": job["name"], "witness_rate": job["witness_rate"],
        "n_tumour": int(np.median([sl.instance_labels.sum() for sl in positives])), "s": config.s,
        "seed": config.seed, "test_auc": auc, "val_auc": float(result.val_metrics.get("auc", np.nan)),
        "best_epoch": result.best_epoch, "collapsed": bool(auc < job["chance_auc"]),
        "witness_mass": _witness_mass(result.attention, data["test"]),
        "p_no_witness": float(np.mean([p_no_witness_without_replacement(sl.n_main, int(sl.instance_labels.sum()),
                                                                        config.s) for sl in positives])),
        "wall_time_s": time.perf_counter() - start,
    }


def collapse_grid(
    configs: Mapping[str, "E2EConfig"],  # noqa: F821 (milstudy.train.e2e.E2EConfig, imported lazily)
    witness_rates: Sequence[float],
    s_values: Sequence[int],
    seeds: Sequence[int],
    cohort: PhaseCohort | SvecPhaseCohort = PhaseCohort(),
    chance_auc: float = 0.6,
    progress: bool = True,
    workers: int = 1,
) -> pd.DataFrame:
    """Train every named config over witness rate x s x seed with random (single-scale) sampling.

    One row per run: ``aggregator``, ``witness_rate``, ``n_tumour`` (median per positive training slide), ``s``,
    ``seed``, ``test_auc``, ``val_auc``, ``best_epoch``, ``collapsed`` (test AUC < ``chance_auc``),
    ``witness_mass`` (attention on tumour patches of positive test slides; uniform attention gives the tumour
    share), ``p_no_witness`` (P0 for one positive slide and step, mean over positive training slides) and
    ``wall_time_s``. Selection is on validation only. ``workers`` > 1: the runs of each witness rate train in
    spawned processes of one torch thread each (``milstudy.parallel.process_map``; the numbers do not change).
    """
    from milstudy.parallel import process_map

    if not 0.5 <= chance_auc <= 1.0:
        raise ValueError(f"chance_auc must be in [0.5, 1], got {chance_auc}")
    rows = []
    for w in witness_rates:
        jobs = [{"name": name, "witness_rate": float(w), "chance_auc": chance_auc,
                 "config": replace(configs[name], sampler="random", s=int(s), seed=int(seed))}
                for s in s_values for name in configs for seed in seeds]
        rows += process_map(_collapse_run, jobs, workers, progress, f"collapse grid, w = {w:g}",
                            shared=phase_splits(w, cohort))
    return pd.DataFrame(rows)


