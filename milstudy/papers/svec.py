"""The S-vec tier of the study (issue 15; specs/abmilx.md §4.1): calibrated, frozen descriptor worlds and the one
end-to-end setting every S-vec notebook trains with.

- ``svec_config(world, aggregator, seed, **overrides)``: the E2E run of the tier (a trainable 2-layer descriptor
  MLP -> any zoo aggregator, random or MRIS sampling), so that the calibration and the compared runs share it.
- ``calibrate(task, values, knob="signal")``: the simplest baseline (mean pooling on the same encoder) trained on
  a generator seed that no compared run uses (``CALIBRATION_SEED``), for each value of one knob, over training
  seeds; ``choose`` picks the value whose seed-mean metric lies in the target band (``TARGET_BAND``) closest to
  its middle. ``milstudy calibrate`` writes the table (``calibration.csv`` + ``.md`` + ``run.json``) and, with
  ``--freeze``, the chosen knobs into ``milstudy/resources/svec_knobs.json``.
- ``calibrated_world(task, seed, **overrides)``: the frozen world of ``task`` (knobs from that file) drawn with a
  compared run's generator seed. Knobs change only by re-running the calibration, never after a compared run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milstudy.data.synthetic.descriptors import TASKS, DescriptorWorld

CALIBRATION_SEED = 1000  # generator seed of the calibration; compared runs draw their worlds with seeds < 1000
KNOBS_FILE = Path(__file__).resolve().parents[1] / "resources" / "svec_knobs.json"
# Target band of the mean-pooling baseline per task metric (issue 15: AUC 0.65-0.90; C-index: our equivalent,
# a band of the same width below, since censored survival ranks are noisier than labels).
TARGET_BAND = {"auc": (0.65, 0.90), "c_index": (0.60, 0.80)}
METRIC = {"detection": "auc", "subtyping": "auc", "grading": "auc", "survival": "c_index"}
# Per-task departures from the defaults, fixed before calibrating: 6-class grading needs more slides and steps
# (at 200 slides and 10 epochs every model stayed at chance in trial runs).
TASK_WORLD = {"grading": {"n_slides": 300}}
TASK_TRAINING = {"grading": {"epochs": 20, "lr": 2e-3}}
# The knob each task is calibrated on and the values tried. The tumour cue strength sets how hard detection,
# grading and survival are; subtyping's label lives in the subtype cue, and the baseline samples the main scale
# only, so its knob is the main-scale subtype cue (the low-scale architecture cue stays stronger, for MRIS).
CALIBRATION_GRID = {
    "detection": ("signal", (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)),
    "subtyping": ("subtype_main", (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    "grading": ("signal", (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)),
    "survival": ("signal", (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)),
}


def base_world(task: str) -> DescriptorWorld:
    """The uncalibrated world of ``task``: :class:`DescriptorWorld` defaults plus ``TASK_WORLD[task]``."""
    return DescriptorWorld(task=task, **TASK_WORLD.get(task, {}))


def svec_config(world: DescriptorWorld, aggregator: str = "mean_pooling", seed: int = 0, **overrides: Any):
    """The tier's E2E run: descriptor MLP (``world.dim`` -> 64 -> 64), ``aggregator`` at width 64 where it takes
    one, single-scale random sampling of ``s = 256`` descriptors per slide, 10 epochs, AdamW lr 1e-3, 4 slides per
    step, selection on validation (``TASK_TRAINING[world.task]`` on top); ``overrides`` replace any
    :class:`~milstudy.train.e2e.E2EConfig` field."""
    from milstudy.train.e2e import E2EConfig

    settings: dict[str, Any] = dict(
        encoder="descriptor_mlp", encoder_kwargs={"in_dim": world.dim, "widths": (64, 64)}, aggregator=aggregator,
        sampler="random", s=256, epochs=10, lr=1e-3, batch_slides=4, seed=int(seed), amp=False, channels_last=False)
    settings.update(TASK_TRAINING.get(world.task, {}))
    settings.update(overrides)
    return E2EConfig(**settings)


# --------------------------------------------------------------------------------------------------- calibration
def calibrate(task: str, values: Sequence[float] | None = None, knob: str | None = None,
              train_seeds: Sequence[int] = (0, 1, 2), base: DescriptorWorld | None = None, progress: bool = True,
              **config_overrides: Any) -> pd.DataFrame:
    """Mean pooling trained on the calibration world (``CALIBRATION_SEED``) for each ``knob`` value (default:
    ``CALIBRATION_GRID[task]``) and training seed. One row per run: task, knob, value, seed, metric (its name),
    test (the test-split metric), val, world (the digest of the world drawn)."""
    from tqdm.auto import tqdm

    from milstudy.data.synthetic.descriptors import descriptor_cohort
    from milstudy.train.e2e import train_e2e

    base = base or base_world(task)
    knob = knob or CALIBRATION_GRID[task][0]
    values = CALIBRATION_GRID[task][1] if values is None else values
    if knob not in {f.name for f in fields(DescriptorWorld)} or knob in ("task", "seed"):
        raise ValueError(f"calibrate: knob must be a DescriptorWorld field other than task/seed, got {knob!r}")
    metric = METRIC[task]
    rows = []
    jobs = [(value, seed) for value in values for seed in train_seeds]
    cohorts: dict[float, Any] = {}
    for value, seed in tqdm(jobs, desc=f"calibrate {task}", disable=not progress):
        if value not in cohorts:
            cohorts[value] = descriptor_cohort(replace(base, task=task, seed=CALIBRATION_SEED, **{knob: value}))
        cohort = cohorts[value]
        result = train_e2e(cohort.splits, cohort.task, svec_config(cohort.world, "mean_pooling", seed,
                                                                    **config_overrides))
        rows.append({"task": task, "knob": knob, "value": float(value), "seed": int(seed), "metric": metric,
                     "test": float(result.test_metrics[metric]), "val": float(result.val_metrics.get(metric, np.nan)),
                     "world": cohort.world.digest()})
    return pd.DataFrame(rows)


def summarize_calibration(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, value): seed mean and sd (ddof=1) of the test metric, the band, and whether the mean is in it."""
    out = table.groupby(["task", "knob", "value", "metric", "world"], as_index=False).agg(
        mean=("test", "mean"), sd=("test", lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else math.nan),
        n_seeds=("test", "size"))
    out["band_low"] = [TARGET_BAND[m][0] for m in out["metric"]]
    out["band_high"] = [TARGET_BAND[m][1] for m in out["metric"]]
    out["in_band"] = (out["mean"] >= out["band_low"]) & (out["mean"] <= out["band_high"])
    return out


def choose(summary: pd.DataFrame) -> dict[str, float | None]:
    """Per task: the knob value whose seed mean is in the band and closest to the band's middle (None if none)."""
    chosen: dict[str, float | None] = {}
    for task, group in summary.groupby("task"):
        inside = group[group["in_band"]]
        if inside.empty:
            chosen[task] = None
            continue
        middle = (inside["band_low"] + inside["band_high"]) / 2
        chosen[task] = float(inside.loc[(inside["mean"] - middle).abs().idxmin(), "value"])
    return chosen


def frozen_knobs(path: Path = KNOBS_FILE) -> dict[str, dict[str, Any]]:
    """``{task: {knob: value, ...}}`` of the frozen worlds (the calibration's output), ``{}`` if not calibrated."""
    try:
        return json.loads(Path(path).read_text())["worlds"]
    except FileNotFoundError:
        return {}


def calibrated_world(task: str, seed: int = 0, path: Path = KNOBS_FILE, **overrides: Any) -> DescriptorWorld:
    """The frozen world of ``task`` with generator ``seed`` (must differ from ``CALIBRATION_SEED``); ``overrides``
    change a knob on purpose (a study's varied factor, e.g. ``n_patches``), never the calibrated one silently."""
    if task not in TASKS:
        raise ValueError(f"calibrated_world: task must be one of {TASKS}, got {task!r}")
    if seed == CALIBRATION_SEED:
        raise ValueError(f"generator seed {CALIBRATION_SEED} is the calibration's; compared runs use another")
    knobs = frozen_knobs(path).get(task)
    if knobs is None:
        raise ValueError(f"{path}: no frozen knobs for task {task!r}; run `milstudy calibrate --tasks {task} "
                         "--freeze` first")
    knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
    return replace(DescriptorWorld(**knobs), seed=int(seed), **overrides)


def freeze(summary: pd.DataFrame, chosen: dict[str, float | None], path: Path = KNOBS_FILE) -> dict[str, Any]:
    """Write the chosen worlds (every knob of ``base_world(task)`` with the chosen value) and their calibration
    rows to ``path``, keeping the tasks not calibrated now."""
    from milstudy.provenance import write_json_atomic

    payload = {"calibration_seed": CALIBRATION_SEED, "target_band": TARGET_BAND,
               "worlds": frozen_knobs(path), "calibrated": {}}
    try:
        payload["calibrated"] = json.loads(Path(path).read_text()).get("calibrated", {})
    except FileNotFoundError:
        pass
    for task, value in chosen.items():
        if value is None:
            continue
        row = summary[(summary["task"] == task) & (summary["value"] == value)].iloc[0]
        world = asdict(replace(base_world(task), **{row["knob"]: value}))
        world.pop("seed")
        payload["worlds"][task] = world
        payload["calibrated"][task] = {"knob": row["knob"], "value": value, "metric": row["metric"],
                                       "mean": round(float(row["mean"]), 4), "sd": round(float(row["sd"]), 4),
                                       "n_seeds": int(row["n_seeds"])}
    write_json_atomic(Path(path), payload)
    return payload


SMOKE_WORLD = {"n_slides": 16, "n_patches": (40, 80)}  # the smoke profile: a few seconds per run


def profile_world(profile: str, task: str, seed: int = 0, n_slides: int | None = None,
                  n_patches: Sequence[int] | None = None) -> tuple[DescriptorWorld, dict[str, list], Any]:
    """The frozen world of ``task`` for a notebook profile (cpu / paper: as calibrated; smoke: ``SMOKE_WORLD``),
    with optional ``n_slides`` / ``n_patches`` (a study's design), drawn: ``(world, slides per split, task)``."""
    from milstudy.data.synthetic.descriptors import descriptor_cohort

    if profile not in ("smoke", "cpu", "paper"):
        raise ValueError(f"profile must be smoke, cpu or paper, got {profile!r}")
    design: dict[str, Any] = dict(SMOKE_WORLD) if profile == "smoke" else {}
    if n_slides:
        design["n_slides"] = int(n_slides)
    if n_patches:
        design["n_patches"] = tuple(int(n) for n in n_patches)
    world = calibrated_world(task, seed=seed, **design)
    cohort = descriptor_cohort(world)
    return world, cohort.splits, cohort.task
