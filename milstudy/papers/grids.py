"""Study helpers every paper's notebooks share: grids of runs over configurations x seeds and their per-run
summaries (mean ± sample sd over seeds, ddof=1). Intervals and verdicts are ``milstudy.analysis`` (claims)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import pandas as pd

if TYPE_CHECKING:
    from milstudy.train.e2e import E2EConfig


def run_grid(
    configs: Mapping[str, "E2EConfig"],
    data: Mapping[str, Sequence],
    task,
    seeds: Sequence[int],
    callbacks: Sequence[Callable] = (),
    progress: bool = True,
    return_predictions: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Train every named config for every seed; one row per run with test/val metrics, epochs and wall time.

    ``return_predictions``: also return the per-slide test predictions of every run, one row per (method = run
    name, seed, slide_id) with the task's target and prediction columns: the input of
    ``milstudy.analysis.claims.claims_table`` (paired, hierarchical-bootstrap intervals).

    Names whose configs are identical (e.g. the default setting of every Table 7 ablation) are trained once per seed
    (training is deterministic given the config); the later rows copy the first one's and name it in ``same_as``.
    """
    from tqdm.auto import tqdm

    from milstudy.train.e2e import train_e2e

    rows, predictions = [], []
    done: dict[str, dict] = {}
    done_predictions: dict[str, pd.DataFrame] = {}
    jobs = [(name, seed) for name in configs for seed in seeds]
    for name, seed in tqdm(jobs, desc="E2E runs", disable=not progress):
        config = replace(configs[name], seed=int(seed))
        key = repr(config)
        if key in done and not callbacks:
            rows.append({**done[key], "run": name, "same_as": done[key]["run"]})
            predictions.append(done_predictions[key].assign(method=name))
            continue
        result = train_e2e(data, task, config, callbacks)
        row = {"run": name, "seed": seed, "best_epoch": result.best_epoch, "epochs": len(result.history),
               "wall_time_s": result.wall_time, "train_time_s": result.train_time, "skipped": result.n_skipped}
        row.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
        row.update({f"val_{k}": v for k, v in result.val_metrics.items()})
        rows.append(row)
        done[key] = row
        test = result.predictions
        test = test[test["split"] == "test"] if "split" in test else test.iloc[0:0]
        done_predictions[key] = test.assign(method=name, seed=seed)
        predictions.append(done_predictions[key])
    frame = pd.DataFrame(rows)
    if "same_as" in frame:
        frame["same_as"] = frame["same_as"].fillna("")
    if return_predictions:
        return frame, pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame()
    return frame


def summarize_grid(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean ± sd over seeds (ddof=1) per run for ``metrics`` (columns of ``run_grid``'s frame) and wall time."""
    cols = [m for m in metrics if m in frame] + ["wall_time_s"]
    grouped = frame.groupby("run", sort=False)[cols]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    out = pd.DataFrame(index=mean.index)
    for col in cols:
        out[col] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[col], std[col])]
        out[f"{col}_mean"] = mean[col]
    out["n_seeds"] = grouped.size()
    return out.reset_index()


def mean_std(frame: pd.DataFrame, by: str | Sequence[str], columns: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """Per group: ``<col>`` as "mean ± std" (sample std over rows, ddof=1; 0 for one row) plus numeric ``<col>_mean`` / ``<col>_std``."""
    by = [by] if isinstance(by, str) else list(by)
    columns = [c for c in columns if c in frame]
    grouped = frame.groupby(by, sort=False)[columns]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    out = pd.DataFrame(index=mean.index)
    for col in columns:
        out[col] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean[col], std[col])]
        out[f"{col}_mean"], out[f"{col}_std"] = mean[col], std[col]
    out["n"] = grouped.size()
    return out.reset_index()
