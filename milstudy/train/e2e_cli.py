"""The end-to-end command line: ``python -m milstudy.train.e2e_cli --config C.yaml | --preset NAME`` (also as
``python -m milstudy.train.e2e``, and under ``torchrun --nproc_per_node=N`` for DDP). See :func:`main`."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from milstudy.data.e2e_slides import load_data
from milstudy.papers.abmilx import PAPER_SETTINGS
from milstudy.train.e2e import E2EConfig, train_e2e


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m milstudy.train.e2e --config C.yaml | --preset NAME`` (or under ``torchrun --nproc_per_node=N``).

    ``--preset`` takes a paper setting (``PAPER_SETTINGS``: brca_subtyping, brca_survival, panda) with the slides
    under ``--slide-root``; ``--set key=value`` overrides single fields. The YAML holds E2EConfig fields plus a
    ``data`` section (see ``load_data``) and an optional ``out`` folder where rank 0 writes ``history.csv``,
    ``metrics.json``, ``predictions.csv`` and ``model.safetensors``, and per-epoch checkpoints under
    ``out/checkpoints`` (unless ``checkpoint_dir`` is set): rerunning the same command resumes an interrupted run.
    """
    import yaml

    parser = argparse.ArgumentParser(prog="python -m milstudy.train.e2e_cli", description=main.__doc__)
    parser.add_argument("--config", help="YAML: E2EConfig fields + data: {...} + out: DIR")
    parser.add_argument("--preset", choices=sorted(PAPER_SETTINGS),
                        help="a paper setting (specs/abmilx.md §5.3) on the manifests in data_manifests/")
    parser.add_argument("--slide-root", help="folder holding the slides of the manifest (default $MILSTUDY_SLIDE_ROOT)")
    parser.add_argument("--out", help="output folder (overrides the config's 'out')")
    parser.add_argument("--fold", type=int, help="use the manifest's fold_K column as the split (e.g. brca_survival: 0, 1, 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an E2EConfig field (YAML value), e.g. --set epochs=5 --set s=256")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.preset):
        parser.error("give exactly one of --config C.yaml or --preset NAME")
    if args.preset:
        from milstudy.paths import REPO_ROOT, slide_root

        root = slide_root(args.slide_root)
        if root is None:
            parser.error("--preset reads real slides: pass --slide-root or set MILSTUDY_SLIDE_ROOT")
        setting = PAPER_SETTINGS[args.preset]
        spec = dict(copy.deepcopy(setting["config"]), patch_cache=False)
        spec["data"] = {**setting["data"], "manifest": str(REPO_ROOT / setting["data"]["manifest"]),
                        "slide_root": str(root)}
    else:
        path = Path(args.config)
        if not path.is_file():
            print(f"error: config file {path} not found", file=sys.stderr)
            return 2
        spec = yaml.safe_load(path.read_text()) or {}
        if args.slide_root and isinstance(spec.get("data"), dict):
            spec["data"]["slide_root"] = args.slide_root
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        spec[key.strip()] = yaml.safe_load(value)
    if args.out:
        spec["out"] = args.out
    if args.fold is not None:
        if not isinstance(spec.get("data"), dict):
            parser.error("--fold needs a 'data' section in the config")
        spec["data"]["fold"] = args.fold
    data_spec = spec.pop("data", None)
    out_dir = spec.pop("out", None)
    if out_dir and not spec.get("checkpoint_dir"):
        spec["checkpoint_dir"] = str(Path(out_dir) / "checkpoints")  # rerunning the command resumes
    if data_spec is None:
        parser.error("the config needs a 'data' section (toy / cohort / manifest)")
    try:
        config = E2EConfig.from_dict(spec)
    except (TypeError, ValueError) as error:  # e.g. --set epochs=abc: name the field instead of a raw traceback
        print(f"error: bad E2E configuration: {error}", file=sys.stderr)
        return 2
    try:
        return _run(config, data_spec, out_dir)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one error style of every milstudy command
        if args.debug:
            raise
        from milstudy.cli import report_error

        return report_error(err)


def _run(config: E2EConfig, data_spec: Any, out_dir: str | None) -> int:
    """Train, then (rank 0) write the summary files into ``out_dir``."""
    from milstudy.train import distributed as dist_utils

    dist = dist_utils.init_from_env(config.device)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    try:
        data, task = load_data(data_spec, seed=config.seed, load_banks=config.patch_cache)
        result = train_e2e(data, task, config, keep_model=True)
        if dist.is_main:
            summary = {"val": result.val_metrics, "test": result.test_metrics, "best_epoch": result.best_epoch,
                       "wall_time_s": result.wall_time, "skipped": result.skipped_slides,
                       "world_size": dist.world_size, "final_train_loss": float(result.history["train_loss"].iloc[-1])}
            print(json.dumps(summary, default=float))
            if out_dir:
                from milstudy.provenance import atomic_write
                from milstudy.train.checkpoint import atomic_write_json, save_weights

                out = Path(out_dir)
                for name, frame in (("history.csv", result.history), ("predictions.csv", result.predictions)):
                    atomic_write(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
                atomic_write_json({**summary, "config": result.config}, out / "metrics.json")
                save_weights(result.model.state_dict(), out / "model.safetensors")
        if dist.enabled and out_dir:
            from milstudy.train.checkpoint import save_weights

            save_weights(result.model.state_dict(), Path(out_dir) / f"model_rank{dist.rank}.safetensors")
    finally:
        dist_utils.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
