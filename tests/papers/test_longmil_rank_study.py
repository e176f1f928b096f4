"""The LongMIL rank study and claims (milstudy.papers.longmil, spec §4.1): tidy rows per seed x kind x temperature,
a fresh foreground per seed, claims scored from the per-seed frame, the committed bench read back."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from milstudy.analysis.claims import claims_table
from milstudy.papers import longmil


def test_rank_study_rows_and_claims():
    kinds = ["full", "local_r10", "nystrom_m16"]
    table = longmil.rank_study(120, [0, 1], kinds, [0.5, 1.0], feature_dim=8, head_dim=8)
    assert len(table) == 2 * 3 * 2 and set(table["kind"]) == set(kinds)
    assert (table["logit_rank"] <= 8).all() and (table["n"] == 120).all()
    seed0, seed1 = (table[(table.seed == s) & (table.kind == "full") & (table.temperature == 1.0)] for s in (0, 1))
    assert float(seed0["effective_rank"].iloc[0]) != float(seed1["effective_rank"].iloc[0])  # fresh draw per seed
    per_seed = longmil.claims_per_seed(table)
    assert len(per_seed) == 2 * 3 and "method" in per_seed
    claims = longmil.rank_claims(kinds)
    assert [c.method_b for c in claims] == ["full"] * 4  # 3 local-vs-full claims + Nyström vs full
    assert longmil.rank_claims(["full", "linear"]) == []
    result = claims_table([c for c in claims if c.method_a == "local_r10"], per_seed=per_seed)
    assert result["n_seeds"].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="temperature"):
        longmil.claims_per_seed(table, temperature=3.0)
    with pytest.raises(ValueError, match="seeds"):
        longmil.rank_study(50, [])


def test_bench_results_are_read_from_the_results_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MILSTUDY_RESULTS", str(tmp_path))
    (tmp_path / "benchmarks").mkdir()
    pd.DataFrame({"impl": ["local_tiled"], "n": [1000]}).to_csv(tmp_path / "benchmarks" / "x.csv", index=False)
    (tmp_path / "benchmarks" / "x.json").write_text(json.dumps({"goals": [{"goal": "g", "pass": "FAIL"}]}))
    assert longmil.bench_results("x")["n"].tolist() == [1000]
    assert longmil.bench_goals("x")["pass"].tolist() == ["FAIL"]
    assert longmil.bench_results("absent") is None
    with pytest.raises(ValueError, match="impls"):
        longmil.remeasure_scaling([100], ["nope"])


def test_remeasure_scaling_runs_one_point_per_subprocess():
    frame = longmil.remeasure_scaling([400], ["local_tiled"])
    assert frame["status"].tolist() == ["ok"] and frame["time_s"].iloc[0] > 0
    assert 0 < frame["share_of_matmul"].iloc[0] and frame["computed_over_useful"].iloc[0] >= 1
