"""The ``milstudy run | list | report`` commands: argument parsing over :mod:`milstudy.runner` (papermill batches,
provenance, the results index) and :mod:`milstudy.studies` (the catalogue, parameters, budgets)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from milstudy import paths
from milstudy.runner import DEFAULT_KERNEL, _sigterm_as_interrupt, format_summary, load_catalog, run_batch, write_report
from milstudy.studies import (StudyError, budget_line, check_profile, last_recorded_run, notebook_parameters,
                              resolve_parameters)


def _add_location_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--notebooks-dir", type=Path, default=None, help="folder of the notebooks (default: notebooks/)")
    parser.add_argument("--studies", type=Path, default=None, help="studies file (default: <notebooks-dir>/studies.yaml)")
    parser.add_argument("--results-root", type=Path, default=None,
                        help="results folder (default: $MILSTUDY_RESULTS or results/)")


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        with _sigterm_as_interrupt():
            outcomes = run_batch(
                args.notebooks, run_all=args.all, profile=args.profile, params=args.param, jobs=args.jobs,
                shard_spec=args.shard, kernel=args.kernel, timeout=args.timeout, notebooks_dir=args.notebooks_dir,
                studies_file=args.studies, results_root=args.results_root,
            )
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the notebook that was running left no result; finished ones are in place",
              file=sys.stderr)
        return 130
    if outcomes:
        print("\n" + format_summary(outcomes))
    return 1 if any(o.status != "ok" for o in outcomes) else 0


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        check_profile(args.profile)
        studies = load_catalog(args.notebooks_dir, args.studies)
        for study in studies.values():
            print(f"{study.stem}  [{study.paper}]  {study.title}")
            if not study.path.is_file():
                print(f"    (missing file {study.path})")
                continue
            resolved = resolve_parameters(study, args.profile, declared=notebook_parameters(study.path))
            print("    " + "  ".join(f"{k}={v!r}" for k, v in resolved.items()))
            results_dir = Path(args.results_root or paths.results_root()) / args.profile
            print("    " + budget_line(study, args.profile, last_recorded_run(results_dir, study.stem)))
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        path = write_report(args.profile, notebooks_dir=args.notebooks_dir, studies_file=args.studies,
                            results_root=args.results_root)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``run``, ``list`` and ``report`` on the ``milstudy`` command."""
    run = subparsers.add_parser("run", help="execute notebooks with papermill into results/<profile>/",
                                description="Execute study notebooks (papermill) under a profile; exit 1 if any "
                                            "failed, 2 on bad input.")
    run.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", help="stem (00_quickstart), number (00), file name or path")
    run.add_argument("--all", action="store_true", help="every notebook in studies.yaml")
    run.add_argument("--profile", default="cpu", help="smoke | cpu | paper (default: cpu)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter (value parsed as YAML: 3, 1e-3, [a,b], true); repeatable")
    run.add_argument("--jobs", type=int, default=1, help="notebooks executed in parallel (default 1)")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run only share I of N (0-based I) of the batch sorted by name, for array jobs")
    run.add_argument("--kernel", default=None, help=f"Jupyter kernel (default: {DEFAULT_KERNEL})")
    run.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds (default: none)")
    _add_location_options(run)
    run.set_defaults(func=_cmd_run)

    lister = subparsers.add_parser("list", help="list the study's notebooks and their resolved parameters")
    lister.add_argument("--profile", default="cpu", help="smoke | cpu | paper (default: cpu)")
    _add_location_options(lister)
    lister.set_defaults(func=_cmd_list)

    report = subparsers.add_parser("report", help="regenerate results/<profile>/README.md")
    report.add_argument("--profile", default="cpu", help="smoke | cpu | paper (default: cpu)")
    _add_location_options(report)
    report.set_defaults(func=_cmd_report)
