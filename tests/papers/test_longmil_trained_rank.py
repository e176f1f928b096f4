"""LongMIL §4.1 with trained weights (milstudy.papers.longmil_trained_rank): the rows, the per-seed cells and the
claims; the structure that holds at any training length (local layers are sparse by their mask)."""

from __future__ import annotations

import numpy as np
import pytest

from milstudy.analysis.claims import claims_table
from milstudy.papers import longmil_trained_rank as tr
from milstudy.train.two_stage import TrainConfig


@pytest.fixture(scope="module")
def table():
    config = TrainConfig(epochs=1, lr=2e-3, device="cpu", quiet=True)
    return tr.trained_rank_study([0, 1], config, width=16, n_bags=24, lengths=(60, 100), n_probe=2, progress=False)


def test_one_row_per_method_seed_state_probe_layer_and_head(table):
    counts = table.groupby(["method", "seed", "state"]).size()
    assert set(counts.index) == {(m, s, st) for m in tr.METHODS for s in (0, 1) for st in ("random init", "trained")}
    assert counts.loc[("FSA + RoPE", 0, "trained")] == 2 * 2  # 2 probe bags x 2 full layers x 1 head
    assert counts.loc[("LongMIL", 0, "trained")] == 2 * 3  # 2 local layers + 1 global
    layer_types = table.groupby("method")["layer_type"].unique()
    assert set(layer_types["FSA + RoPE"]) == {"full"} and set(layer_types["LongMIL"]) == {"local", "global"}
    assert table.loc[table["state"] == "trained", "val_auc"].notna().all()
    assert table.loc[table["state"] == "random init", "val_auc"].isna().all()
    probes = table.groupby("method")["slide_id"].unique()
    assert set(probes["FSA + RoPE"]) == set(probes["LongMIL"]) and len(probes["LongMIL"]) == 2  # the same bags
    local = table[table["layer_type"] == "local"]
    assert (local["sparsity"] > 0.5).all() and (table.loc[table["layer_type"] == "full", "sparsity"] < 0.5).all()


def test_per_seed_cells_feed_the_claims(table):
    per_seed = tr.trained_rank_per_seed(table)
    assert {"FSA + RoPE full (trained)", "LongMIL local (trained)", "FSA + RoPE full (random init)"} <= set(
        per_seed["method"])
    cell = per_seed[(per_seed["method"] == "LongMIL local (trained)") & (per_seed["seed"] == 0)].iloc[0]
    expected = table[(table["method"] == "LongMIL") & (table["layer_type"] == "local") & (table["seed"] == 0)
                     & (table["state"] == "trained")]["effective_rank_frac"].mean()
    assert cell["effective_rank_frac"] == pytest.approx(expected)
    claims = claims_table(tr.trained_rank_claims(), per_seed=per_seed)
    assert len(claims) == 3 and claims["n_seeds"].eq(2).all() and np.isfinite(claims["difference"]).all()


def test_too_few_held_out_bags_are_named():
    with pytest.raises(ValueError, match="held-out bags < n_probe"):
        tr.trained_rank_study([0], TrainConfig(epochs=1, device="cpu", quiet=True), n_bags=12, lengths=(60, 70),
                              n_probe=5, progress=False)
    with pytest.raises(ValueError, match="seeds is empty"):
        tr.trained_rank_study([], TrainConfig(epochs=1, device="cpu", quiet=True))
