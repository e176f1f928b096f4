"""The work behind ``milstudy train`` / ``milstudy eval`` (:mod:`milstudy.train.two_stage_cli`): one (seed, fold) run
and its files, the checkpoint (weights + what rebuilds the model), the summary table, provenance. Every file is
written to a temporary name and renamed into place."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from milstudy.train import two_stage_inputs as inputs
from milstudy.train.checkpoint import atomic_torch_save
from milstudy.train.two_stage_inputs import atomic_write, write_csv, write_npy

log = logging.getLogger("milstudy.cli")
CHECKPOINT_FORMAT = "milstudy.two_stage/1"
NOT_SETTABLE = ("seed", "device", "quiet", "save_attention", "checkpoint_dir", "resume", "snapshot_slides")


def train_fields() -> set[str]:
    """The ``TrainConfig`` fields a run's settings may hold (seed, device and the rest the CLI sets itself)."""
    from dataclasses import fields

    from milstudy.train.two_stage import TrainConfig

    return {f.name for f in fields(TrainConfig)} - set(NOT_SETTABLE)


def _task_record(task: Any, spec: Mapping[str, Any], classes: list | None) -> dict[str, Any]:
    if task.name == "survival":
        edges = None if task.bin_edges is None else [float(e) for e in task.bin_edges]
        return {"type": "survival", "loss": task.loss_name, "n_bins": int(task.n_bins), "bin_edges": edges}
    return {"type": "classification", "classes": list(classes or []), "label_column": spec["label_column"]}


def task_from_record(record: Mapping[str, Any]):
    """The fitted task a checkpoint was trained with (classes, or survival bin edges and loss)."""
    from milstudy.train.tasks import ClassificationTask, SurvivalTask

    if record["type"] == "survival":
        return SurvivalTask(bin_edges=record["bin_edges"], n_bins=record["n_bins"], loss=record["loss"])
    return ClassificationTask(classes=list(range(len(record["classes"]))))


def write_json(payload: Mapping[str, Any], path: Path) -> Path:
    """Indented JSON atomically (numpy scalars and paths as plain values; NaN as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.generic,)):
            value = value.item()
        if isinstance(value, float) and not np.isfinite(value):
            return None
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

    text = json.dumps(clean(payload), indent=1) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def with_class_names(frame: pd.DataFrame, classes: list | None) -> pd.DataFrame:
    """Predictions plus ``target_class`` / ``predicted_class`` (the names of the head indices) for classification."""
    if classes is None or "prediction" not in frame.columns:
        return frame
    frame = frame.copy()
    names = np.asarray([str(c) for c in classes], dtype=object)
    frame["target_class"] = names[frame["target"].to_numpy(int)]
    frame["predicted_class"] = names[frame["prediction"].to_numpy(int)]
    return frame


def write_attention(attention: Mapping[str, np.ndarray], folder: Path) -> None:
    """``folder/<slide_id>.npy`` per slide (``[heads, N]``)."""
    for slide_id, values in attention.items():
        if "/" in slide_id or "\\" in slide_id or slide_id.startswith("."):
            raise ValueError(f"slide id {slide_id!r} cannot name an attention file; rename it in the manifest")
        write_npy(np.asarray(values), folder / f"{slide_id}.npy")


def save_checkpoint(path: Path, model: torch.nn.Module, spec: Mapping[str, Any], in_dim: int, task: Any,
                    classes: list | None, config: Any, extra: Mapping[str, Any]) -> Path:
    """Model weights + what rebuilds it (name, kwargs, in_dim, n_out, fitted task, eval settings), atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "model": spec["model"], "model_kwargs": dict(spec["model_kw"]),
               "in_dim": int(in_dim), "n_out": int(task.n_out), "task": _task_record(task, spec, classes),
               "eval_batch_size": int(config.eval_batch_size), "amp": bool(config.amp),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "train_config": json.loads(json.dumps(config.to_dict(), default=str)), **extra}
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A ``milstudy train`` checkpoint (weights_only load); refuses other files naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input here
        from milstudy.console import torch_load_refusal

        raise ValueError(torch_load_refusal(err, f"--checkpoint {path}")) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--checkpoint {path}: not a `milstudy train` checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def summary_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (seed, fold), then ``mean`` and ``sd`` (ddof=1; NaN for a single run) of every metric column."""
    runs = pd.DataFrame(rows)
    metric_cols = [c for c in runs.columns if c.startswith(("val_", "test_"))]
    values = runs[metric_cols].astype(float)
    extra = pd.DataFrame([{"seed": "mean", **values.mean().to_dict()},
                          {"seed": "sd", **values.std(ddof=1).to_dict()}])
    return pd.concat([runs.astype({"seed": object, "fold": object}), extra], ignore_index=True)


def provenance(command: str, settings: Mapping[str, Any], device: str, started: float, start_iso: str) -> dict:
    """``run.json``: the command, its settings, the device used, timing and ``provenance.environment_info()``."""
    from milstudy.provenance import environment_info, now_iso

    return {"command": command, "settings": dict(settings), "resolved_device": device, "start": start_iso,
            "end": now_iso(), "wall_time_s": round(time.perf_counter() - started, 2), **environment_info()}


# ------------------------------------------------------------------------------------------------ building
def build_train_config(spec: Mapping[str, Any], seed: int, device: str):
    """The ``TrainConfig`` of one run (the settings that are its fields, the seed, the resolved device)."""
    from milstudy.train.two_stage import TrainConfig

    values = {k: v for k, v in spec.items() if k in train_fields()}
    values.update(seed=seed, device=device, quiet=True, save_attention=bool(spec["save_attention"]))
    if log.isEnabledFor(logging.DEBUG):
        values.setdefault("log_every", 1)
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad training setting: {err}") from None


def build_named_model(name: str, in_dim: int, n_out: int, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """``build_model`` with one-line errors: an unknown name gets a did-you-mean, a bad keyword names --model-kw."""
    from milstudy.models.base import build_model, list_models

    known = list_models()
    if name not in known:
        raise ValueError(f"--model: unknown model {name!r}{inputs.did_you_mean(name, known)} (known: {', '.join(known)})")
    try:
        return build_model(name, in_dim, n_out, **dict(kwargs))
    except TypeError as err:
        raise ValueError(f"--model-kw {dict(kwargs)} for model {name!r}: {err}") from None


def make_task(spec: Mapping[str, Any], classes: list | None, targets: Sequence[Any] | None = None):
    """The task of the settings: classification over ``classes`` (head indices 0..C-1) or survival, whose bin edges
    come from each training split (``survival_bin_edges: train``, the default) or from all ``targets`` of the cohort
    (``cohort``: the upstream ABMILX convention; the setting is recorded in run.json with the others)."""
    from milstudy.train.tasks import ClassificationTask, SurvivalTask

    if spec["task"] == "survival":
        edges_from = spec.get("survival_bin_edges", "train")
        n_bins, loss = int(spec["n_bins"]), str(spec["survival_loss"])
        if edges_from not in ("train", "cohort"):
            raise ValueError(f"survival_bin_edges must be 'train' or 'cohort', got {edges_from!r}")
        if edges_from == "train":
            return SurvivalTask(n_bins=n_bins, loss=loss)
        if targets is None:
            raise ValueError("survival_bin_edges=cohort needs the cohort's targets")
        return SurvivalTask.from_cohort(list(targets), n_bins, loss)
    # the head is indexed 0..C-1 (the dataset's targets); the class names live in the checkpoint and the outputs
    return ClassificationTask(classes=list(range(len(classes))), class_weights=spec.get("class_weights"))


# ------------------------------------------------------------------------------------------------ train
def splits_for(spec: Mapping[str, Any], table: pd.DataFrame, dataset: Any, task: Any, seed: int) -> list[inputs.Split]:
    """The (train, val, test) slide ids of every fold for ``seed``: k-fold, a split column or CLAM splits files."""
    if spec.get("folds") is not None:
        from milstudy.train.cv import kfold_splits

        labels = task.stratify_labels(dataset.targets)
        cases = dict(zip(table["slide_id"].astype(str), table["case_id"].astype(str)))
        ids = np.asarray(dataset.slide_ids)
        groups = np.asarray([cases[s] for s in ids])
        if int(spec["folds"]) > len(set(groups)):
            raise ValueError(f"--folds {spec['folds']}: {spec['manifest']} has only {len(set(groups))} cases "
                             "(case_id) to spread over the folds; use fewer folds")
        try:
            folds = kfold_splits(labels, groups, int(spec["folds"]), seed, float(spec["val_fraction"]))
        except ValueError as err:  # e.g. more folds than cases, or a class too rare to stratify
            raise ValueError(f"--folds {spec['folds']} (val_fraction {spec['val_fraction']}) on "
                             f"{spec['manifest']}: {err}") from None
        return [{part: ids[idx].tolist() for part, idx in zip(inputs.SPLITS, fold)} for fold in folds]
    if spec.get("split_column") is not None:
        return inputs.split_column_splits(table, str(spec["split_column"]), str(spec["manifest"]))
    return inputs.read_splits_csv(spec["splits_csv"], table, str(spec["manifest"]))


def _subsets(dataset: Any, split: inputs.Split) -> dict[str, Any]:
    position = {sid: i for i, sid in enumerate(dataset.slide_ids)}
    dropped = [s for part in inputs.SPLITS for s in split[part] if s not in position]
    if dropped:
        log.warning("%d slide(s) of the split have empty bags and are left out: %s", len(dropped), dropped[:5])
    return {part: inputs.BagSubset(dataset, [position[s] for s in split[part] if s in position]) if split[part]
            else None for part in inputs.SPLITS}


def run_one(spec: Mapping[str, Any], dataset: Any, task: Any, classes: list | None, split: inputs.Split, seed: int,
            fold: int, device: str, out: Path) -> dict[str, Any]:
    """Train one (seed, fold), write its outputs under ``out``; returns its summary row."""
    from milstudy.train.two_stage import seed_everything, train_two_stage

    config = build_train_config(spec, seed, device)
    parts = _subsets(dataset, split)
    seed_everything(seed)
    model = build_named_model(str(spec["model"]), int(dataset.feature_dim), task.n_out, spec["model_kw"])
    result = train_two_stage(model, task, parts["train"], parts["val"], parts["test"], config)
    counts = {f"n_{p}": 0 if parts[p] is None else len(parts[p]) for p in inputs.SPLITS}
    metrics = {"seed": seed, "fold": fold, **counts, "best_epoch": result.best_epoch, "monitor": result.monitor,
               "epochs_run": len(result.history), "wall_time_s": round(result.wall_time, 3), "device": device,
               "val": result.val_metrics, "test": result.test_metrics, "test_last_epoch": result.test_metrics_last}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(with_class_names(result.predictions, classes), out / "predictions.csv")
    write_csv(result.history, out / "history.csv")
    if spec["save_attention"]:
        write_attention(result.attention, out / "attention")
    save_checkpoint(out / "checkpoint.pt", model, spec, int(dataset.feature_dim), result.task, classes, config,
                    {"seed": seed, "fold": fold, "best_epoch": result.best_epoch})
    write_json(metrics, out / "metrics.json")
    test = result.test_metrics or {}
    shown = ", ".join(f"test {k} {v:.3f}" for k, v in test.items() if k == result.task.primary_metric) or "no test"
    log.info("seed %d fold %d: best epoch %d (val %s %.3f), %s, %.1f s", seed, fold, result.best_epoch,
             result.monitor, result.val_metrics.get(result.monitor, float("nan")), shown, result.wall_time)
    return {"seed": seed, "fold": fold, **counts, "best_epoch": result.best_epoch,
            **{f"val_{k}": v for k, v in result.val_metrics.items()}, **{f"test_{k}": v for k, v in test.items()}}
