"""The S-vec calibration (milstudy.papers.svec): band choice, frozen knobs, and the committed calibration."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from milstudy.data.synthetic.descriptors import DescriptorWorld
from milstudy.papers import svec

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "results" / "calibration" / "calibration_summary.csv"


def _summary(means: dict[float, float], task: str = "detection") -> pd.DataFrame:
    table = pd.DataFrame([{"task": task, "knob": "signal", "value": v, "seed": s, "metric": svec.METRIC[task],
                           "test": m + d, "val": 0.5, "world": "x"}
                          for v, m in means.items() for s, d in enumerate((-0.01, 0.0, 0.01))])
    return svec.summarize_calibration(table)


def test_choose_takes_the_in_band_value_nearest_the_middle_or_none():
    summary = _summary({1.0: 0.55, 2.0: 0.70, 3.0: 0.80, 4.0: 0.95})
    assert list(summary["in_band"]) == [False, True, True, False]
    assert summary["sd"].iloc[0] == pytest.approx(0.01)  # ddof=1 over the three seeds
    assert svec.choose(summary) == {"detection": 3.0}  # 0.80 is nearer 0.775 than 0.70
    assert svec.choose(_summary({1.0: 0.5, 2.0: 0.95})) == {"detection": None}
    survival = _summary({1.0: 0.62, 2.0: 0.85}, task="survival")  # C-index band 0.60-0.80
    assert svec.choose(survival) == {"survival": 1.0}


def test_freeze_then_calibrated_world_round_trip(tmp_path):
    path = tmp_path / "knobs.json"
    summary = _summary({2.0: 0.70, 3.0: 0.80})
    svec.freeze(summary, svec.choose(summary), path)
    world = svec.calibrated_world("detection", seed=3, path=path)
    assert world == replace(svec.base_world("detection"), signal=3.0, seed=3)
    assert json.loads(path.read_text())["calibrated"]["detection"]["mean"] == pytest.approx(0.80)
    assert svec.calibrated_world("detection", seed=3, path=path, n_patches=(50, 60)).n_patches == (50, 60)
    with pytest.raises(ValueError, match="calibration's"):
        svec.calibrated_world("detection", seed=svec.CALIBRATION_SEED, path=path)
    with pytest.raises(ValueError, match="no frozen knobs for task 'grading'.*milstudy calibrate"):
        svec.calibrated_world("grading", path=path)
    with pytest.raises(ValueError, match="task must be one of"):
        svec.calibrated_world("staging", path=path)


def test_calibrate_runs_mean_pooling_on_the_calibration_seed():
    tiny = DescriptorWorld(task="detection", n_slides=12, n_patches=(40, 60))
    table = svec.calibrate("detection", [2.0], train_seeds=[0], base=tiny, progress=False, epochs=1, s=16)
    assert list(table.columns[:6]) == ["task", "knob", "value", "seed", "metric", "test"]
    assert table["world"].iloc[0] == replace(tiny, signal=2.0, seed=svec.CALIBRATION_SEED).digest()
    with pytest.raises(ValueError, match="knob must be"):
        svec.calibrate("detection", [1.0], knob="seed", base=tiny)


def test_frozen_knobs_are_the_committed_calibration_and_in_band():
    """Every frozen world is the world the committed calibration measured (same digest at the calibration seed),
    and its mean-pooling score there is inside the band: knobs cannot change without re-calibrating."""
    assert COMMITTED.exists(), f"{COMMITTED} is missing: run `milstudy calibrate --freeze` and commit its output"
    summary = pd.read_csv(COMMITTED)
    calibrated = json.loads(svec.KNOBS_FILE.read_text())["calibrated"]
    assert calibrated, "svec_knobs.json freezes no world"
    for task, record in calibrated.items():
        world = replace(svec.calibrated_world(task, seed=0), seed=svec.CALIBRATION_SEED)
        row = summary[(summary["task"] == task) & (summary["world"] == world.digest())]
        assert len(row) == 1, f"{task}: the frozen world is not one the committed calibration measured"
        low, high = svec.TARGET_BAND[row["metric"].iloc[0]]
        assert low <= row["mean"].iloc[0] <= high and row["mean"].iloc[0] == pytest.approx(record["mean"], abs=1e-4)


def test_profile_world_smoke_is_small_and_draws_the_frozen_knobs():
    world, splits, task = svec.profile_world("smoke", "detection", seed=2)
    frozen = svec.calibrated_world("detection", seed=2)
    assert world == replace(frozen, n_slides=16, n_patches=(40, 80))
    assert sum(len(v) for v in splits.values()) == 16 and task.primary_metric == "auc"
    with pytest.raises(ValueError, match="profile must be"):
        svec.profile_world("laptop", "detection")


def test_collapse_grid_on_the_svec_world_reports_p0_per_slide():
    from milstudy.papers.abmilx_collapse import SvecPhaseCohort, collapse_grid, phase_splits

    cohort = SvecPhaseCohort(n_slides=12, n_patches=(40, 60), seed=1)
    splits = phase_splits(0.1, cohort)
    positives = [s for s in splits["train"] if s.target]
    assert positives and all(abs(s.instance_labels.mean() - 0.1) <= 1 / s.n_main + 0.01 for s in positives)
    config = svec.svec_config(svec.calibrated_world("detection", seed=1), "abmil", 0, epochs=1, s=8)
    runs = collapse_grid({"ABMIL": config}, [0.1], [8, 64], [0], cohort, progress=False)
    assert list(runs["s"]) == [8, 64] and runs.loc[1, "p_no_witness"] == 0.0 < runs.loc[0, "p_no_witness"]
