"""Study helpers every paper's notebooks share: grids of runs over configurations x seeds and their per-run
summaries (mean ± sample sd over seeds, ddof=1). Intervals and verdicts are ``milstudy.analysis`` (claims)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import pandas as pd

if TYPE_CHECKING:
    from milstudy.train.e2e import E2EConfig


@dataclass
class RunCache:
    """Finished E2E runs by (config, seed), shared between ``run_grid`` calls of one notebook: a run that an earlier
    grid trained (the same config and seed; training is deterministic given the config) is copied, not retrained."""

    rows: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # the run name a config was first trained under


def run_row(result, seed: int, **extra) -> tuple[dict, pd.DataFrame]:
    """A finished run (a ``FitResult`` of either training path) -> (its grid row: seed, best epoch, epochs, wall
    time, ``extra``, ``test_*`` / ``val_*`` metrics; its per-slide test predictions)."""
    row = {"seed": int(seed), "best_epoch": result.best_epoch, "epochs": len(result.history),
           "wall_time_s": result.wall_time, **extra}
    row.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
    row.update({f"val_{k}": v for k, v in result.val_metrics.items()})
    test = result.predictions
    return row, (test[test["split"] == "test"] if "split" in test else test.iloc[0:0])


def _train_one(config: "E2EConfig", shared: tuple) -> tuple[dict, pd.DataFrame]:
    """One E2E run -> (its row without the run name, its test predictions); in a worker process or in-line."""
    from milstudy.train.e2e import train_e2e

    data, task, callbacks = shared
    result = train_e2e(data, task, config, callbacks)
    return run_row(result, config.seed, train_time_s=result.train_time, skipped=result.n_skipped)


def run_grid(
    configs: Mapping[str, "E2EConfig"],
    data: Mapping[str, Sequence],
    task,
    seeds: Sequence[int],
    callbacks: Sequence[Callable] = (),
    progress: bool = True,
    return_predictions: bool = False,
    workers: int = 1,
    cache: RunCache | None = None,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Train every named config for every seed; one row per run with test/val metrics, epochs and wall time.

    ``return_predictions``: also return the per-slide test predictions of every run, one row per (method = run
    name, seed, slide_id) with the task's target and prediction columns: the input of
    ``milstudy.analysis.claims.claims_table`` (paired, hierarchical-bootstrap intervals).

    Names whose configs are identical (e.g. the default setting of every Table 7 ablation) are trained once per seed
    (training is deterministic given the config); the later rows copy the first one's and name it in ``same_as``.
    ``cache`` extends that to runs of earlier ``run_grid`` calls. ``workers`` > 1: the runs train in spawned
    processes of one torch thread each (``milstudy.parallel.process_map``); the numbers do not change. Callbacks
    collect state in this process, so they need ``workers=1`` and are never served from the cache.
    """
    from milstudy.parallel import process_map

    if callbacks and workers > 1:
        raise ValueError("run_grid: callbacks collect their state in this process; use workers=1 with callbacks")
    cache = RunCache() if cache is None or callbacks else cache
    keyed = [(name, int(seed), replace(configs[name], seed=int(seed))) for name in configs for seed in seeds]
    key_of = (lambda name, config: f"{name}|{config!r}") if callbacks else (lambda name, config: repr(config))
    todo: dict[str, "E2EConfig"] = {}
    for name, _, config in keyed:
        key = key_of(name, config)
        if key not in cache.rows and key not in todo:
            todo[key] = config
    trained = process_map(_train_one, list(todo.values()), workers, progress, "E2E runs",
                          shared=(data, task, tuple(callbacks)))
    for key, (row, test) in zip(todo, trained):
        cache.rows[key], cache.predictions[key] = row, test
    rows, predictions = [], []
    for name, seed, config in keyed:
        key = key_of(name, config)
        first = cache.names.setdefault(key, name)
        rows.append({"run": name, **cache.rows[key], **({"same_as": first} if first != name else {})})
        predictions.append(cache.predictions[key].assign(method=name, seed=seed))
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
