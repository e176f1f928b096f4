"""The per-slide status summary of the command-line tools."""

from __future__ import annotations

import pandas as pd

from milstudy.console import report_slide_statuses


def _summary(statuses: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(statuses))], "status": statuses,
                         "message": ["why"] * len(statuses)})


def test_lists_problem_slides_and_exit_code(capsys):
    code = report_slide_statuses(_summary(["ok", "missing", "empty"]), "1/3 ok", failing=("missing",))
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and out == ["1/3 ok", "  missing: s1: why", "  empty: s2: why"]
    assert report_slide_statuses(_summary(["ok", "empty"]), "h", failing=("missing",)) == 0
    assert report_slide_statuses(_summary(["ok", "empty"]), "h") == 1  # default: anything but ok fails


def test_long_lists_are_cut_with_counts(capsys):
    report_slide_statuses(_summary(["missing"] * 30 + ["unreadable"] * 3), "h", limit=5)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 5 + 1 and out[-1] == "  ... and 28 more: missing 25, unreadable 3"
