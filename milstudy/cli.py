"""The ``milstudy`` command line: one entry point, subcommands contributed by the modules that own them.

Each module listed in ``_COMMAND_MODULES`` exposes ``add_commands(subparsers)``; it registers its
subcommands and sets ``func`` on each parser (``func(args) -> int`` exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "milstudy.runner",  # run, list, report
    "milstudy.data.cli",  # data synth | tile | check
    "milstudy.features",  # features extract
    "milstudy.bench",  # bench
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
