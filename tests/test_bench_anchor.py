"""The anchor benchmark's case runner (milstudy.bench.anchor) and the shared subprocess runner."""

from milstudy.bench import anchor
from milstudy.bench._subprocess import run_case


def test_measure_case_times_a_training_step_and_an_eval_forward():
    row = anchor.measure_case("abmil_anchor_nsf", 64, threads=1)
    assert row["train_step_s"] > 0 and row["eval_s"] > 0 and row["peak_mem_mb"] >= 0


def test_a_failing_case_reports_its_error_instead_of_raising():
    row = run_case("milstudy.bench.anchor", "measure_case", "no_such_model", 8, timeout=120, threads=1)
    assert row["status"].startswith("error:") and "no_such_model" in row["status"]
