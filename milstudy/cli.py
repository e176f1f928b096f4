"""The ``milstudy`` command line: one entry point, subcommands contributed by the modules that own them.

Each module listed in ``_COMMAND_MODULES`` exposes ``add_commands(subparsers)``; it registers its
subcommands and sets ``func`` on each parser (``func(args) -> int`` exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "milstudy.runner_cli",  # run, list, report
    "milstudy.data.cli",  # data synth | tile | check
    "milstudy.features",  # features extract
    "milstudy.bench",  # bench
    "milstudy.train.two_stage_cli",  # train, eval (two-stage, feature bags)
    "milstudy.papers.svec_cli",  # calibrate (the S-vec worlds)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milstudy", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a layer not built yet must not break the others
            if err.name and name.startswith(err.name):
                continue
            raise
        module.add_commands(subparsers)
    return parser


def report_error(err: BaseException) -> int:
    """One line on stderr for an error that ended a command; the exit code (2 bad input, 1 failure)."""
    import errno

    hint = " (rerun with --debug for the traceback)"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        print(f"error: disk full (ENOSPC): {err.filename or err}; free space and rerun (finished outputs are "
              "kept)", file=sys.stderr)
        return 1
    if isinstance(err, FileNotFoundError):
        print(f"error: {err}", file=sys.stderr)
        return 2
    if isinstance(err, (ValueError, TypeError, KeyError)):  # manifests, labels, settings, slide ids: bad input
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"error: {type(err).__name__}: {err}{hint}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (``ValueError`` and its kinds: manifest, label, slide-id errors; a missing file)
    is one line on stderr and exit 2; other failures one line and exit 1; ``--debug`` (anywhere) re-raises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "quiet"):  # commands with --quiet / --verbose (milstudy.console.add_logging_flags)
            from milstudy.console import command_logging

            with command_logging(args.quiet, getattr(args, "verbose", False)):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one error style for every command
        if debug:
            raise
        return report_error(err)


if __name__ == "__main__":
    sys.exit(main())
