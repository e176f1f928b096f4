"""The local-attention bench's bookkeeping (milstudy.bench.local_attention): log-log slopes, the skip rule, FLOP
rates and the issue-13 goal verdicts; one point measured in-process. No timing is asserted (DESIGN: targets live in
benchmarks)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from milstudy.bench import local_attention as bench


def _frame(local_16k=1.0, masked_16k=25.0, fused_64k=50.0, mem_16k=100.0, mem_64k=450.0, mem_100k=900.0):
    rows = [("local_tiled", 16000, local_16k, mem_16k, 2.0), ("local_tiled", 64000, 4 * local_16k, mem_64k, 2.0),
            ("local_tiled", 100_000, 6 * local_16k, mem_100k, 2.0), ("sdpa_masked", 16000, masked_16k, 5000, 10.0),
            ("sdpa_fused", 64000, fused_64k, 10, 1.0)]
    frame = pd.DataFrame(rows, columns=["impl", "n", "time_s", "peak_mem_mb", "computed_over_useful"])
    return frame.assign(status="ok")


def test_loglog_slope_recovers_the_exponent_and_ignores_small_n():
    n = pd.Series([1000, 4000, 8000, 16000])
    values = pd.Series([999.0, 3.0 * 4000**2, 3.0 * 8000**2, 3.0 * 16000**2])
    assert bench.loglog_slope(n, values) == pytest.approx(2.0)
    assert math.isnan(bench.loglog_slope(n[:2], values[:2]))


def test_goals_pass_and_fail_from_the_measured_points():
    goals = bench.goal_table(_frame()).set_index("goal")["pass"].tolist()
    assert goals == ["pass", "FAIL", "pass", "pass", "pass"]  # 25x, 12.5x, 4.5x, 900 MB, 2.0
    goals = bench.goal_table(_frame(masked_16k=10.0, mem_64k=600.0, mem_100k=3000.0)).set_index("goal")
    assert goals["pass"].tolist() == ["FAIL", "FAIL", "FAIL", "FAIL", "pass"]
    assert goals["measured"].iloc[0] == pytest.approx(10.0)
    missing = bench.goal_table(_frame().query("impl != 'sdpa_fused'"))
    assert missing["pass"].iloc[1] == "not measured"


def test_skip_rule_extrapolates_time_and_memory(monkeypatch):
    monkeypatch.setattr(bench, "memory_cap_mb", lambda: 5000.0)
    previous = {"n": 8000, "status": "ok", "time_s": 40.0, "peak_mem_mb": 100.0}
    assert bench._skip_reason("local_tiled", 16000, previous) is None  # 80 s linear
    assert "exceeds" in bench._skip_reason("sdpa_fused", 16000, previous)  # 160 s quadratic
    assert "exceeds" in bench._skip_reason("sdpa_masked", 80000, {**previous, "time_s": 0.1})  # 100x: 10 GB
    assert bench._skip_reason("sdpa_fused", 80000, {**previous, "time_s": 0.1}) is None  # memory ~ N: 1 GB
    assert "did not finish" in bench._skip_reason("local_tiled", 16000, {"n": 8000, "status": "timeout"})


def test_rates_are_flops_over_time_and_share_of_matmul():
    frame = pd.DataFrame({"impl": ["local_tiled"] * 2, "n": [4000, 8000], "time_s": [1.0, 2.0],
                          "peak_mem_mb": [10.0, 20.0], "computed_pairs": [2e6, 4e6], "useful_pairs": [1e6, 2e6],
                          "status": "ok"})
    out = bench.add_rates(frame, matmul_rate=10.0)
    np.testing.assert_allclose(out["gflops_computed"], 14 * 64 * 2e6 / 1e9)
    np.testing.assert_allclose(out["share_of_matmul"], out["gflops_computed"] / 10.0)
    assert out["computed_over_useful"].tolist() == [2.0, 2.0]
    assert out["time_slope"].iloc[0] == pytest.approx(1.0) and out["memory_slope"].iloc[0] == pytest.approx(1.0)


def test_memory_cap_is_at_most_the_constant_and_the_peak_counter_resets():
    assert 0 < bench.memory_cap_mb() <= bench.MAX_CASE_MB
    import numpy as np

    block = np.ones(20_000_000)  # 160 MB, then freed: the reset must forget this peak
    del block
    current = bench.reset_peak_rss()
    assert bench.peak_rss_mb() - current < 100


def test_one_point_measures_in_process_and_bad_impl_is_named():
    point = bench.measure_case("local_tiled", 300)
    assert point["time_s"] > 0 and point["runs"] >= 1 and point["peak_mem_mb"] >= 0
    computed, useful = bench.pair_counts("local_tiled", 300)
    assert computed >= useful > 300  # every token keeps itself and its neighbours
    assert bench.pair_counts("sdpa_fused", 300) == (90000, 90000)
    with pytest.raises(ValueError, match="impl"):
        bench._step("dense", 10)()
