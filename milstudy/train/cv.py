"""k-fold cross-validation, multi-seed repeats and their aggregation (specs/abmilx.md §3 pitfalls 4, 6, 7).

Protocol, per seed:
1. Stratified k-fold at the patient level (``StratifiedGroupKFold``; groups = ``Bag.case_id`` or the slide id),
   shuffled with the seed. Each fold is the **test** set once.
2. From the other k-1 folds a stratified, group-aware validation split (``val_fraction``, default 12.5 % as
   upstream's ``val_ratio``) drives model selection and early stopping. The test fold is never used for selection.
3. Optional ``preprocess(train_bags, other_bags)`` (e.g. ``milstudy.data.classic_mil.standardize``) is fitted on the
   training bags of the fold only.

Aggregation: per-fold test metrics as mean ± std over all (seed, fold) runs, and the out-of-fold predictions pooled
over the k folds of each seed with a slide-level percentile bootstrap (the metric of a resample is the mean over
seeds of the pooled metric, so repeated seeds do not pass for extra slides).

``run_model_grid`` runs the whole model-by-fold grid for a notebook and returns tidy tables.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from tqdm.auto import tqdm

from milstudy.train.metrics import bootstrap_ci, summarize
from milstudy.train.tasks import ClassificationTask, Task
from milstudy.train.two_stage import TrainConfig, seed_everything, train_two_stage

Preprocess = Callable[[list, list], tuple[list, list]]


@dataclass
class CVResult:
    """Cross-validation of one model.

    runs: one row per (seed, fold): best_epoch, wall_time, ``val_*``, ``test_*`` (best epoch) and ``test_last_*``.
    predictions: pooled out-of-fold test predictions (``seed, fold`` + the trainer's prediction columns).
    summary: one row per test metric: mean, std, text ("mean ± std"), pooled, boot_mean, boot_std, ci_lo, ci_hi.
    """

    runs: pd.DataFrame
    predictions: pd.DataFrame
    summary: pd.DataFrame
    histories: dict[tuple[int, int], pd.DataFrame] = field(default_factory=dict)


def _groups(bags: Sequence[Any]) -> np.ndarray:
    return np.asarray([str(getattr(b, "case_id", None) or b.slide_id) for b in bags])


def kfold_splits(
    labels: np.ndarray, groups: np.ndarray, k: int, seed: int, val_fraction: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(train, val, test)`` index arrays for each of the k folds (see the module docstring)."""
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    splits = []
    for fold, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        # fewer inner splits when a class is rare, so that every class can reach the validation split
        smallest = np.unique(labels[rest], return_counts=True)[1].min()
        n_inner = max(2, min(round(1.0 / val_fraction), int(smallest), len(np.unique(groups[rest]))))
        inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed * 1000 + fold)
        fit, val = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
        splits.append((rest[fit], rest[val], test))
    return splits


def _call_builder(build_model_fn: Callable[..., nn.Module], seed: int) -> nn.Module:
    takes_seed = "seed" in inspect.signature(build_model_fn).parameters
    return build_model_fn(seed=seed) if takes_seed else build_model_fn()


def cross_validate(
    build_model_fn: Callable[..., nn.Module],
    task: Task,
    bags: Sequence[Any],
    k: int = 10,
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    val_fraction: float = 0.125,
    preprocess: Preprocess | None = None,
    n_bootstrap: int = 1000,
    progress: bool = True,
    desc: str = "cv",
    bootstrap_metrics: Sequence[str] | None = None,
) -> CVResult:
    """Stratified (patient-level) k-fold CV of ``build_model_fn()`` (called after seeding; may take ``seed=``).

    bags: a list of ``Bag`` objects (or any indexable dataset of bags). ``bootstrap_metrics``: the metrics that get a
    pooled bootstrap CI (None = all; the others get NaN CIs, which saves time). Returns a ``CVResult``.
    """
    from milstudy.data.bags import BagListDataset

    config = config or TrainConfig()
    bags = [bags[i] for i in range(len(bags))]
    labels = task.stratify_labels([b.target for b in bags])
    groups = _groups(bags)
    rows, frames, histories = [], [], {}
    total = len(seeds) * k
    bar = tqdm(total=total, desc=desc, disable=not progress or config.quiet, leave=False)
    for seed in seeds:
        for fold, (train_idx, val_idx, test_idx) in enumerate(kfold_splits(labels, groups, k, seed, val_fraction)):
            train, val, test = ([bags[i] for i in idx] for idx in (train_idx, val_idx, test_idx))
            if preprocess is not None:
                train, other = preprocess(train, val + test)
                val, test = other[: len(val)], other[len(val):]
            run_config = dataclasses.replace(config, seed=seed, quiet=True)
            if config.checkpoint_dir is not None:
                run_config.checkpoint_dir = Path(config.checkpoint_dir) / f"seed{seed}_fold{fold}"
            seed_everything(seed)
            model = _call_builder(build_model_fn, seed)
            result = train_two_stage(model, task, BagListDataset(train), BagListDataset(val),
                                     BagListDataset(test), run_config)
            row: dict[str, Any] = {"seed": seed, "fold": fold, "n_train": len(train), "n_val": len(val),
                                   "n_test": len(test), "best_epoch": result.best_epoch,
                                   "epochs_run": len(result.history), "wall_time": result.wall_time}
            row.update({f"val_{m}": v for m, v in result.val_metrics.items()})
            row.update({f"test_{m}": v for m, v in (result.test_metrics or {}).items()})
            row.update({f"test_last_{m}": v for m, v in (result.test_metrics_last or {}).items()})
            rows.append(row)
            oof = result.predictions[result.predictions["split"] == "test"].copy()
            oof.insert(0, "fold", fold)
            oof.insert(0, "seed", seed)
            frames.append(oof)
            histories[(seed, fold)] = result.history
            bar.update(1)
    bar.close()
    runs = pd.DataFrame(rows)
    predictions = pd.concat(frames, ignore_index=True)
    fitted_task = result.task
    metric_names = [c[len("test_"):] for c in runs.columns if c.startswith("test_") and not c.startswith("test_last_")]
    summary = summarize_cv(runs, predictions, fitted_task, metric_names, n_bootstrap, bootstrap_metrics)
    return CVResult(runs, predictions, summary, histories)


def summarize_cv(
    runs: pd.DataFrame,
    predictions: pd.DataFrame,
    task: Task,
    metric_names: Sequence[str],
    n_bootstrap: int = 1000,
    bootstrap_metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-metric summary of a CV: per-run mean ± std and the seed-averaged pooled OOF metric with bootstrap CI."""
    seeds = sorted(predictions["seed"].unique())
    per_seed = [predictions[predictions["seed"] == s].set_index("slide_id") for s in seeds]
    slide_ids = per_seed[0].index.to_numpy()
    per_seed = [frame.loc[slide_ids] for frame in per_seed]  # same slide order in every seed

    def pooled(name: str, rows: np.ndarray) -> float:
        return float(np.mean([task.frame_metric(frame.iloc[rows], name) for frame in per_seed]))

    fast = {name: _array_metric(task, per_seed, name) for name in metric_names}

    out = []
    for name in metric_names:
        values = runs[f"test_{name}"].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        try:
            pooled_value = pooled(name, np.arange(len(slide_ids)))
        except ValueError:
            pooled_value = float("nan")
        index = np.arange(len(slide_ids))
        wanted = bootstrap_metrics is None or name in bootstrap_metrics
        metric_fn = fast[name] or (lambda rows, _, name=name: pooled(name, rows))
        ci = bootstrap_ci(metric_fn, index, index, n=n_bootstrap if wanted else 0, seed=0)
        out.append({"metric": name, "mean": finite.mean() if len(finite) else np.nan,
                    "std": finite.std(ddof=1) if len(finite) > 1 else 0.0, "text": summarize(values),
                    "n_runs": len(values), "n_undefined": int((~np.isfinite(values)).sum()),
                    "pooled": pooled_value, "boot_mean": ci.mean, "boot_std": ci.std, "ci_lo": ci.lo, "ci_hi": ci.hi})
    return pd.DataFrame(out)


def _array_metric(task: Task, per_seed: Sequence[pd.DataFrame], name: str) -> Callable | None:
    """``fn(rows, _) -> float``: the seed-averaged pooled accuracy or binary AUC on numpy arrays, for the bootstrap.

    Same values as ``task.frame_metric`` (AUC as the Mann-Whitney statistic with average ranks for ties, which is
    what ``roc_auc_score`` computes) without scikit-learn's input validation on every resample (about 3 ms per call,
    seconds per 1000 resamples). None for every other task/metric (they take the generic path).
    """
    if not isinstance(task, ClassificationTask) or name not in ("accuracy", "auc") or (name == "auc" and task.n_out != 2):
        return None
    from scipy.stats import rankdata

    arrays = [(frame["target"].to_numpy(), frame[[f"prob_{k}" for k in range(task.n_out)]].to_numpy(np.float64))
              for frame in per_seed]

    def accuracy(rows: np.ndarray, _: Any) -> float:
        return float(np.mean([np.mean(prob[rows].argmax(axis=1) == y[rows]) for y, prob in arrays]))

    def auc(rows: np.ndarray, _: Any) -> float:
        values = []
        for y, prob in arrays:
            positive = y[rows] == 1
            n_pos = int(positive.sum())
            n_neg = len(rows) - n_pos
            if n_pos == 0 or n_neg == 0:
                raise ValueError("roc_auc is undefined: only one class present in y_true")
            ranks = rankdata(prob[rows, 1])
            values.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        return float(np.mean(values))

    return accuracy if name == "accuracy" else auc


def aggregate_runs(results: Mapping[str, CVResult], metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per model: ``"<metric>"`` = "mean ± std" over runs, ``"<metric> pooled [95% CI]"`` from the bootstrap."""
    rows = []
    for name, result in results.items():
        row: dict[str, Any] = {"model": name}
        for _, line in result.summary.iterrows():
            if metrics is not None and line["metric"] not in metrics:
                continue
            row[line["metric"]] = line["text"]
            if not np.isfinite(line["pooled"]):
                pooled = "n/a"
            elif np.isfinite(line["ci_lo"]):
                pooled = f"{line['pooled']:.3f} [{line['ci_lo']:.3f}, {line['ci_hi']:.3f}]"
            else:  # no bootstrap asked for this metric
                pooled = f"{line['pooled']:.3f}"
            row[f"{line['metric']} pooled [95% CI]"] = pooled
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class ModelGrid:
    """``run_model_grid`` output: per-model CV results, a tidy per-run table and the long summary table."""

    results: dict[str, CVResult]
    runs: pd.DataFrame
    summary: pd.DataFrame

    def table(self, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        return aggregate_runs(self.results, metrics)

    def fold_units(self, metric: str, prefix: str = "") -> pd.DataFrame:
        """The ``per_seed`` frame of ``milstudy.analysis.claims.claims_table`` with test folds as matched units: one
        row per (model, repeat, fold), columns ``method`` (``prefix + model``), ``seed`` (``1000 * seed + fold``,
        the same fold of the same repeat for every model) and ``metric`` (its ``test_`` value). Folds of one
        repeat share training bags, so intervals over them are optimistic; say so where they are quoted."""
        runs = self.runs[self.runs["metric"] == f"test_{metric}"]
        if runs.empty:
            raise ValueError(f"fold_units: no test_{metric} in this grid; metrics: "
                             f"{sorted(m[5:] for m in self.runs['metric'].unique() if m.startswith('test_'))}")
        return pd.DataFrame({"method": prefix + runs["model"].astype(str), "seed": 1000 * runs["seed"] + runs["fold"],
                             metric: runs["value"].to_numpy()}).reset_index(drop=True)


def _grid_job(job: dict[str, Any], bags: list) -> CVResult:
    """Cross-validate one registered model (a ``run_model_grid`` job; runs in a worker process or in-line)."""
    from milstudy.models.base import build_model

    name, kwargs, in_dim, task = job["name"], job["kwargs"], job["in_dim"], job["task"]
    return cross_validate(
        lambda: build_model(name, in_dim, task.n_out, **kwargs), task, bags, job["k"], job["seeds"],
        job["config"], job["val_fraction"], job["preprocess"], job["n_bootstrap"], job["progress"], desc=name,
        bootstrap_metrics=job["bootstrap_metrics"],
    )


def run_model_grid(
    model_names: Sequence[str],
    task: Task,
    bags: Sequence[Any],
    k: int = 10,
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    preprocess: Preprocess | None = None,
    val_fraction: float = 0.125,
    n_bootstrap: int = 1000,
    progress: bool = True,
    bootstrap_metrics: Sequence[str] | None = None,
    workers: int = 1,
) -> ModelGrid:
    """Cross-validate every registered model in ``model_names`` on the same folds.

    Models are built with ``milstudy.models.build_model(name, in_dim, task.n_out, **model_kwargs.get(name, {}))``,
    ``in_dim`` read from the first bag. ``workers`` > 1: one model per spawned process, one torch thread each
    (``milstudy.parallel.process_map``; the numbers do not change, every run seeds itself; ``preprocess`` must then
    be a module-level function). Returns per-run rows (``model, seed, fold, metric, value``, tidy) and the
    per-model summary (``model`` + ``CVResult.summary`` columns).
    """
    from milstudy.parallel import process_map

    in_dim = int(bags[0].features.shape[-1])
    model_kwargs = model_kwargs or {}
    bags = [bags[i] for i in range(len(bags))]
    jobs = [{"name": name, "kwargs": dict(model_kwargs.get(name, {})), "in_dim": in_dim, "task": task, "k": k, "seeds": list(seeds), "config": config, "val_fraction": val_fraction, "preprocess": preprocess,
             "n_bootstrap": n_bootstrap, "progress": progress and workers == 1,
             "bootstrap_metrics": bootstrap_metrics} for name in model_names]
    results = dict(zip(model_names, process_map(_grid_job, jobs, workers, progress, "models", shared=bags)))
    tidy = []
    for name, result in results.items():
        metric_cols = [c for c in result.runs.columns if c.startswith(("test_", "val_"))]
        long = result.runs.melt(id_vars=["seed", "fold"], value_vars=metric_cols, var_name="metric")
        long.insert(0, "model", name)
        tidy.append(long)
    summary = pd.concat([r.summary.assign(model=n) for n, r in results.items()], ignore_index=True)
    summary = summary[["model", *[c for c in summary.columns if c != "model"]]]
    return ModelGrid(results, pd.concat(tidy, ignore_index=True), summary)
