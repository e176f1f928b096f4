"""What the command-line tools share on the console: per-slide status summaries (stdout, the command's result)
and logging (stderr): ``add_logging_flags`` gives a command ``--quiet`` (warnings and errors only, no progress
bars) and ``--verbose`` (debug lines: one per slide or epoch), and ``milstudy.cli.main`` runs every command that
has them inside ``command_logging``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def report_slide_statuses(
    summary: pd.DataFrame, headline: str, failing: Collection[str] | None = None, limit: int = 25,
    quiet: Collection[str] = ("ok",),
) -> int:
    """Print ``headline`` and one line per problem slide (status not in ``quiet``), failing statuses first (the
    first ``limit``, then a count per status of the rest); successes (``quiet`` statuses) only as a count in the
    headline. Return the exit code.

    ``summary`` has columns ``slide_id``, ``status``, ``message`` (and ``path`` if known). The code is 1 when a
    status in ``failing`` occurs (None: any status not in ``quiet``), else 0.
    """
    print(headline)
    bad = summary[~summary["status"].isin(list(quiet))]
    if failing is not None and len(bad):
        order = (~bad["status"].isin(list(failing))).astype(int)
        bad = bad.assign(_order=order.to_numpy()).sort_values("_order", kind="stable").drop(columns="_order")
    for _, row in bad.head(limit).iterrows():
        where = f" ({row['path']})" if "path" in row and isinstance(row["path"], str) else ""
        print(f"  {row['status']}: {row['slide_id']}{where}: {row['message']}")
    if len(bad) > limit:
        rest = bad.iloc[limit:]["status"].value_counts().sort_index()
        print(f"  ... and {len(bad) - limit} more: " + ", ".join(f"{k} {v}" for k, v in rest.items()))
    fails = bad if failing is None else bad[bad["status"].isin(list(failing))]
    return 1 if len(fails) else 0


def torch_load_refusal(err: BaseException, what: str) -> str:
    """One line (no ANSI colour codes) for a ``torch.load(weights_only=True)`` that refused or failed on ``what``.

    A pickle that holds objects other than tensors, numbers and containers (unpickling it could run code) is "not a
    safe weights_only checkpoint" with torch's own reason (the global it refused); any other error is "not a
    readable torch checkpoint" with its first line.
    """
    import pickle
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    if isinstance(err, pickle.UnpicklingError):
        marker = "WeightsUnpickler error: "
        reason = next((line[len(marker):] for line in lines if line.startswith(marker)), lines[0] if lines else "")
        reason = reason.split(". Please use")[0].rstrip(".")  # torch's advice is how to load it unsafely
        return (f"{what} is not a safe weights_only checkpoint ({reason}); refused because unpickling it "
                "could run code; save plain tensors (a state dict or safetensors)")
    return f"{what} is not a readable torch checkpoint ({type(err).__name__}: {lines[0] if lines else ''})"


# ------------------------------------------------------------------------------------------------ logging
@contextmanager
def command_logging(quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """``milstudy.*`` loggers to stderr for one command: INFO by default, WARNING with ``--quiet``, DEBUG with
    ``--verbose``; the logger's level and handlers are restored afterwards (``main()`` called from Python)."""
    logger = logging.getLogger("milstudy")
    previous = logger.level
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class _StderrHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (not the one at creation, which pytest's capture may have closed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never end a run
            self.handleError(record)


def add_logging_flags(parser: argparse.ArgumentParser, verbose_help: str = "debug messages, one line per slide"
                      ) -> None:
    """``--quiet`` / ``--verbose`` (mutually exclusive) on a command's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="warnings and errors only; no progress bars")
    group.add_argument("--verbose", action="store_true", help=verbose_help)


def progress_disabled(args: argparse.Namespace) -> bool:
    """True under ``--quiet``: progress bars stay off."""
    return bool(getattr(args, "quiet", False))
