"""``milstudy train`` and ``milstudy eval``: two-stage MIL (frozen feature bags -> aggregator) from the command line.

* ``milstudy train --manifest M.csv --features DIR --model abmil --folds 5 --seeds 0 1 2 --out runs/x`` (or
  ``--config run.yaml``, or ``--preset NAME``: a paper's setting, ``milstudy.papers.longmil_cohorts.TRAIN_PRESETS``;
  flags and ``--set key=value`` override either): per seed and fold, ``<out>/seed<s>/fold<f>/`` gets
  ``metrics.json``, ``predictions.csv`` (validation and test slides), ``history.csv``, ``checkpoint.pt`` and, with
  ``--save-attention``, ``attention/<slide_id>.npy``; ``<out>`` gets ``summary.csv`` (one row per run, then the
  mean and the sd (ddof=1) over folds x seeds) and ``run.json``. Selection (best epoch) uses validation only.
* ``milstudy eval --checkpoint C.pt --manifest M.csv --features DIR --out DIR``: rebuilds the model, scores every
  bag of the manifest, writes ``predictions.csv``, ``metrics.json`` and ``run.json``.

Split sources: ``--folds K`` (stratified k-fold grouped by case, a validation share carved from the training folds:
``milstudy.train.cv.kfold_splits``), ``--split-column COL`` (train / val / test) or ``--splits-csv FILE|DIR``
(CLAM ``splits_<k>.csv``). Every output file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from milstudy.console import add_logging_flags

log = logging.getLogger("milstudy.cli")
OWN_KEYS = ("manifest", "features", "model", "model_kw", "task", "classes", "label_column", "class_weights",
            "n_bins", "survival_loss", "survival_bin_edges", "folds", "split_column", "splits_csv", "val_fraction", "seeds", "device",
            "out", "save_attention", "preload")
_DEFAULTS = {"task": "classification", "label_column": "label", "model_kw": {}, "seeds": [0], "device": "auto",
             "val_fraction": 0.125, "save_attention": False, "preload": False, "n_bins": 4, "survival_loss": "nll",
             "survival_bin_edges": "train"}




# ------------------------------------------------------------------------------------------------ settings
def _key_value(item: str, option: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
    return key.strip(), yaml.safe_load(value)


def preset_settings(name: str) -> dict[str, Any]:
    """A paper's two-stage setting (``milstudy.papers.longmil_cohorts.TRAIN_PRESETS``), its manifest path made
    absolute from the repository root; refused naming the known presets."""
    from milstudy.papers.longmil_cohorts import TRAIN_PRESETS
    from milstudy.paths import REPO_ROOT

    if name not in TRAIN_PRESETS:
        raise ValueError(f"--preset {name!r}: unknown; known: {', '.join(sorted(TRAIN_PRESETS))}")
    spec = dict(TRAIN_PRESETS[name])
    spec["manifest"] = str(REPO_ROOT / spec["manifest"])
    return spec


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the ``--config`` YAML, then the flags given, then ``--set``; unknown keys refused."""
    import yaml

    from milstudy.train.two_stage_inputs import did_you_mean
    from milstudy.train.two_stage_runs import train_fields

    spec: dict[str, Any] = {}
    if getattr(args, "preset", None):
        spec = preset_settings(args.preset)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config must be a mapping of settings, got {type(loaded).__name__}")
        spec = {**spec, **loaded}
    for key in OWN_KEYS + ("epochs", "lr"):
        value = getattr(args, key, None)
        if value is not None and value is not False and key != "model_kw":
            spec[key] = value
    if args.model_kw:
        spec["model_kw"] = {**(spec.get("model_kw") or {}), **dict(_key_value(i, "--model-kw") for i in args.model_kw)}
    for item in args.set:
        key, value = _key_value(item, "--set")
        spec[key] = value
    known = set(OWN_KEYS) | train_fields()
    for key in spec:
        if key not in known:
            raise ValueError(f"unknown setting {key!r}{did_you_mean(key, sorted(known))} (known: "
                             f"{', '.join(sorted(known))})")
    spec = {**_DEFAULTS, **spec}
    for key in ("manifest", "features", "model", "out"):
        if not spec.get(key):
            raise ValueError(f"missing setting '{key}': pass --{key} or set '{key}:' in the config")
    sources = [k for k in ("folds", "split_column", "splits_csv") if spec.get(k) is not None]
    if len(sources) != 1:
        raise ValueError("give exactly one split source: --folds K, --split-column COL or --splits-csv FILE|DIR"
                         + (f" (got {sources})" if sources else ""))
    if not isinstance(spec["model_kw"], dict):
        raise ValueError(f"model_kw must be a mapping, got {spec['model_kw']!r}")
    if spec.get("classes") is not None and not isinstance(spec["classes"], list):
        raise ValueError(f"classes must be a list (--classes A B, or classes: [A, B]), got {spec['classes']!r}")
    spec["seeds"] = [int(s) for s in (spec["seeds"] if isinstance(spec["seeds"], list) else [spec["seeds"]])]
    return spec


def cmd_train(args: argparse.Namespace) -> int:
    """``milstudy train``: see the module docstring (``milstudy.cli.main`` sets up logging)."""
    from milstudy.data.bags import BagDataset
    from milstudy.provenance import now_iso
    from milstudy.train import two_stage_inputs as inputs
    from milstudy.train import two_stage_runs as runs

    started, start_iso = time.perf_counter(), now_iso()
    spec = train_settings(args)
    device = inputs.resolve_device_name(str(spec["device"]))
    runs.build_train_config(spec, spec["seeds"][0], device)  # a bad --set value fails before any data is read
    log.info("device: %s", inputs.describe_device(device))
    feature_dir = inputs.resolve_feature_dir(spec["features"])
    log.info("features: %s", feature_dir)
    table, classes = inputs.load_labelled_manifest(spec["manifest"], feature_dir, str(spec["task"]),
                                                   str(spec["label_column"]), spec.get("classes"))
    if spec["task"] == "survival":
        dataset = BagDataset(table, feature_dir, target="survival", lazy=not spec["preload"])
    else:
        dataset = BagDataset(table, feature_dir, target="target", classes=list(range(len(classes))),
                             lazy=not spec["preload"])
        log.info("classes: %s", classes)
    for slide_id, reason in dataset.skipped:
        log.warning("slide '%s' skipped: %s", slide_id, reason)
    task = runs.make_task(spec, classes, dataset.targets if spec["task"] == "survival" else None)
    runs.build_named_model(str(spec["model"]), int(dataset.feature_dim), task.n_out, spec["model_kw"])  # fail early
    out = Path(spec["out"])
    plan = [(seed, fold, split) for seed in spec["seeds"]  # every split checked before anything trains
            for fold, split in enumerate(runs.splits_for(spec, table, dataset, task, seed))]
    rows = [runs.run_one(spec, dataset, task, classes, split, seed, fold, device, out / f"seed{seed}" / f"fold{fold}")
            for seed, fold, split in plan]
    summary = runs.summary_table(rows)
    inputs.write_csv(summary, out / "summary.csv")
    runs.write_json(runs.provenance("train", spec, device, started, start_iso), out / "run.json")
    means = summary[summary["seed"] == "mean"].iloc[0]
    primary = f"test_{task.primary_metric}" if f"test_{task.primary_metric}" in summary else f"val_{task.primary_metric}"
    log.info("%d run(s); %s mean %.3f (sd %.3f); outputs in %s", len(rows), primary, means[primary],
             summary[summary["seed"] == "sd"].iloc[0][primary], out)
    return 0


# ------------------------------------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    """``milstudy eval``: see the module docstring (``milstudy.cli.main`` sets up logging)."""
    from milstudy.data.bags import BagDataset
    from milstudy.provenance import now_iso
    from milstudy.train import two_stage_inputs as inputs
    from milstudy.train import two_stage_runs as runs
    from milstudy.train.two_stage import evaluate

    started, start_iso = time.perf_counter(), now_iso()
    payload = runs.load_checkpoint(args.checkpoint)
    record = payload["task"]
    device = inputs.resolve_device_name(args.device)
    log.info("device: %s", inputs.describe_device(device))
    feature_dir = inputs.resolve_feature_dir(args.features)
    label_column = args.label_column or record.get("label_column", "label")
    table, _ = inputs.load_labelled_manifest(args.manifest, feature_dir, record["type"], label_column,
                                             record.get("classes"), f"checkpoint {args.checkpoint}")
    if record["type"] == "survival":
        dataset = BagDataset(table, feature_dir, target="survival")
    else:
        dataset = BagDataset(table, feature_dir, target="target", classes=list(range(len(record["classes"]))))
    if dataset.feature_dim != payload["in_dim"]:
        raise ValueError(f"--features {feature_dir}: features have dimension {dataset.feature_dim}, the checkpoint's "
                         f"model takes {payload['in_dim']} (another encoder?)")
    task = runs.task_from_record(record)
    model = runs.build_named_model(payload["model"], payload["in_dim"], payload["n_out"], payload["model_kwargs"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:  # the model's code changed since the checkpoint was written
        raise ValueError(f"--checkpoint {args.checkpoint}: its weights do not fit model {payload['model']!r} "
                         f"({str(err).splitlines()[0]})") from None
    model.to(device)
    result = evaluate(model, task, dataset, "eval", device, int(payload["eval_batch_size"]),
                      bool(payload["amp"]) and device.startswith("cuda"), bool(args.save_attention))
    out = Path(args.out)
    inputs.write_csv(runs.with_class_names(result.predictions, record.get("classes")), out / "predictions.csv")
    if args.save_attention:
        runs.write_attention(result.attention, out / "attention")
    runs.write_json({"checkpoint": str(args.checkpoint), "manifest": str(args.manifest), "n_slides": len(dataset),
                     "skipped": [s for s, _ in dataset.skipped], "loss": result.loss, "metrics": result.metrics},
                    out / "metrics.json")
    settings = {k: getattr(args, k) for k in ("checkpoint", "manifest", "features", "out", "device", "label_column")}
    runs.write_json(runs.provenance("eval", settings, device, started, start_iso), out / "run.json")
    log.info("%d slide(s): %s; outputs in %s", len(dataset),
             ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items()), out)
    return 0


# ------------------------------------------------------------------------------------------------ parsers
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` on the ``milstudy`` command."""
    p = subparsers.add_parser("train", help="two-stage MIL training on feature bags (k-fold or fixed splits)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--preset", help="a paper's setting (longmil_bracs_3class, longmil_bracs_7class, "
                   "longmil_tcga_brca_subtyping, longmil_tcga_brca_survival); --config, flags and --set override it")
    p.add_argument("--config", help="YAML of settings (the flag names with underscores, + TrainConfig fields)")
    p.add_argument("--manifest", help="CSV: slide_id, label (or time/survival_months + event), optional case_id")
    p.add_argument("--features", help="feature folder (<slide_id>.h5/.pt; CLAM h5_files/ pt_files/; TRIDENT features_*/)")
    p.add_argument("--model", help="a registered model name (milstudy.models.list_models())")
    p.add_argument("--model-kw", dest="model_kw", action="append", default=[], metavar="KEY=VALUE",
                   help="model keyword argument (YAML value); repeatable")
    p.add_argument("--task", choices=("classification", "survival"), help="default classification")
    p.add_argument("--label-column", dest="label_column", help="class label column (default 'label')")
    p.add_argument("--classes", nargs="+", help="declared classes in head order (default: from the labels)")
    p.add_argument("--folds", type=int, help="stratified k-fold by case")
    p.add_argument("--split-column", dest="split_column", help="manifest column with train / val / test")
    p.add_argument("--splits-csv", dest="splits_csv", help="CLAM splits_<k>.csv, or a folder of them")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto (CUDA when available) | cpu | cuda[:N]; default auto")
    p.add_argument("--out", help="output folder")
    p.add_argument("--save-attention", dest="save_attention", action="store_true",
                   help="write attention/<slide_id>.npy for the validation and test slides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting or TrainConfig field (YAML value), e.g. --set patience=10")
    add_logging_flags(p, "debug messages and one line per epoch")
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("eval", help="score a `milstudy train` checkpoint on the bags of a manifest")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt written by milstudy train")
    e.add_argument("--manifest", required=True)
    e.add_argument("--features", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--label-column", dest="label_column", help="default: the checkpoint's")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    e.add_argument("--save-attention", dest="save_attention", action="store_true")
    add_logging_flags(e, "debug messages and one line per epoch")
    e.set_defaults(func=cmd_eval)
