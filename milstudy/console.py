"""Console summaries shared by the command-line tools."""

from __future__ import annotations

from collections.abc import Collection
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
