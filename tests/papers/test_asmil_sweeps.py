"""ASMIL's λ sweep, ablation and overfitting curves (milstudy.papers.asmil_sweeps, notebook 23)."""

import numpy as np
import pandas as pd
import pytest

from milstudy.models import build_model
from milstudy.papers import asmil as A
from milstudy.papers import asmil_sweeps as S
from milstudy.train.two_stage import TrainConfig


def test_names_and_specs_say_what_changed():
    assert S.asmil_name(1) == "ASMIL" and S.asmil_name(0) == "ASMIL without anchor"
    assert S.asmil_name(0.01) == "ASMIL (λ = 0.01)"
    assert S.asmil_name(0.1, "softmax", False) == "ASMIL (λ = 0.1), softmax anchor target, no token drop"
    assert S.asmil_name(0, "softmax", False) == "ASMIL without anchor, no token drop"  # no anchor: no target
    assert S.asmil_spec(0) == ("asmil_net", {})
    assert S.asmil_spec(0.03, "softmax", False) == ("asmil", {"drop_rate": 0.0, "anchor_lambda": 0.03,
                                                               "anchor_target": "softmax"})
    # the names the notebook-20 table already has mean the same models
    assert A.VARIANTS["ASMIL"][0] == S.asmil_spec(1)[0] and A.VARIANTS["ASMIL without anchor"] == S.asmil_spec(0)
    with pytest.raises(ValueError, match="anchor weight"):
        S.asmil_name(-1)
    with pytest.raises(ValueError, match="target"):
        S.asmil_name(1, "entmax")


def test_sweep_specs_cover_every_lambda_and_the_five_ablation_cells_once():
    specs = S.sweep_specs([0.01, 1.0], ablation_lambda=1.0)
    assert list(specs) == ["ASMIL without anchor", "ASMIL (λ = 0.01)", "ASMIL", "ASMIL, softmax anchor target",
                           "ASMIL, no token drop", "ASMIL without anchor, no token drop"]
    model = build_model(*specs["ASMIL, no token drop"][:1], 8, 2, **specs["ASMIL, no token drop"][1])
    assert model.lam == 1.0 and model.online.drop_rate == 0.0 and model.target_kind == "nsf"
    softmax = build_model(specs["ASMIL, softmax anchor target"][0], 8, 2, **specs["ASMIL, softmax anchor target"][1])
    assert softmax.target_kind == "softmax"
    assert len(S.sweep_specs([0.01], ablation_lambda=0.1)) == 6  # λ = 0 and 0.01, then 4 cells at 0.1 (one shared)


def test_overfitting_reads_the_fall_from_the_peak_per_run():
    history = pd.DataFrame({"method": ["m"] * 4 + ["n"] * 3, "seed": [0] * 7,
                            "epoch": [1, 2, 3, 4, 3, 1, 2], "val_auc": [0.5, 0.9, 0.7, 0.6, 0.8, 0.6, 0.7]})
    table = S.overfitting(history).set_index("method")
    assert table.loc["m", "peak"] == 0.9 and table.loc["m", "peak_epoch"] == 2
    assert table.loc["m", "val_auc_fall"] == pytest.approx(0.3)
    assert table.loc["n", "last"] == 0.8 and table.loc["n", "val_auc_fall"] == 0.0  # epochs sorted: 0.6, 0.7, 0.8
    with pytest.raises(KeyError, match="val_f1"):
        S.overfitting(history, "val_f1")


def test_lambda_zero_through_the_sweep_runner_trains_as_the_bare_network():
    """λ = 0 is the bare network (spec §6.8): the wrapper at λ = 0 gives the same training as asmil_net."""
    data = A.asmil_bags("smoke", seed=3, label_noise=0.2)
    config = TrainConfig(epochs=2, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    specs = {"wrapped at 0": ("asmil", {"anchor_lambda": 0.0}), **S.sweep_specs([], 1.0)}
    result = A.run_dynamics(data, ["wrapped at 0", "ASMIL without anchor"], [0], config, n_tracked=2, small=True,
                            progress=False, specs=specs)
    runs = result.predictions.pivot_table(index="slide_id", columns="method", values="prob_1")
    np.testing.assert_array_equal(runs["wrapped at 0"], runs["ASMIL without anchor"])


@pytest.fixture(scope="module")
def sweep():
    data = A.asmil_bags("smoke", seed=3, label_noise=0.2)
    config = TrainConfig(epochs=3, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    specs = S.sweep_specs([0.1], ablation_lambda=0.1)
    return A.run_dynamics(data, [*specs, "ABMIL"], [0, 1], config, n_tracked=2, small=True, progress=False,
                          specs=specs)


def test_sweep_tables_and_claims(sweep):
    ablation = S.ablation_table(sweep.per_seed(), 0.1)
    assert ablation["method"].tolist() == [S.cell_name(cell, 0.1) for cell in S.ABLATION_CELLS]
    assert ablation[["anchor", "NSF", "rd"]].values.tolist()[1] == ["✓", "✗", "✓"] and (ablation["n"] == 2).all()
    only_two = S.ablation_table(sweep.per_seed().query("method in ['ASMIL (λ = 0.1)', 'ASMIL without anchor']"), 0.1)
    assert only_two["method"].tolist() == ["ASMIL (λ = 0.1)", "ASMIL without anchor"]  # cells that ran, in order
    table = S.lambda_table(sweep.per_seed(), [0.1])
    assert table["anchor_lambda"].tolist() == [0.0, 0.1] and (table["n"] == 2).all()
    bands = S.curves(sweep.history)
    assert set(bands["epoch"]) == {1, 2, 3} and (bands["count"] == 2).all()
    claims = S.sweep_claims(sweep, [0.1], ablation_lambda=0.1, n_resamples=400)
    assert len(claims) == 7 and set(claims["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    fall = claims[claims["metric"] == "val_auc_fall"]
    assert len(fall) == 2 and fall["interval"].str.startswith("paired t").all()
    assert (claims.loc[claims["metric"] == "auc", "n_slides"] > 0).all()
    only = S.sweep_claims(sweep, [0.1, 0.5], ablation_lambda=0.1, n_resamples=400)  # λ = 0.5 did not run
    assert len(only) == 7


def test_unknown_variants_still_fail_with_the_extra_specs():
    with pytest.raises(ValueError, match="unknown ASMIL study variant 'ASMIL .λ = 7.'"):
        A.variant_spec("ASMIL (λ = 7)", specs=S.sweep_specs([0.1], 1.0))


def test_token_sweep_specs_keep_their_size_in_the_small_profile():
    specs = S.token_specs([2, 8], [0.25, 0.75], lam=0.003, profile=(4, 0.5))
    assert list(specs) == ["ASMIL (λ = 0.003), K = 2", "ASMIL (λ = 0.003), K = 8", "ASMIL (λ = 0.003), rd 0.25",
                           "ASMIL (λ = 0.003), rd 0.75"]
    registry, kwargs = A.variant_spec("ASMIL (λ = 0.003), K = 8", small=True, specs=specs)
    assert kwargs["n_tokens"] == 8 and kwargs["dim"] == A.SMALL_ASMIL["dim"]  # the variant's K beats the profile's
    model = build_model(registry, 8, 2, **kwargs)
    assert model.online.n_tokens == 8 and model.online.n_drop == 4 and model.lam == 0.003
    rate = build_model(*A.variant_spec("ASMIL (λ = 0.003), rd 0.75", small=True, specs=specs)[:1], 8, 2,
                       **A.variant_spec("ASMIL (λ = 0.003), rd 0.75", small=True, specs=specs)[1])
    assert rate.online.n_tokens == A.SMALL_ASMIL["n_tokens"] and rate.online.n_drop == 3  # round(0.75 * 4)
    assert A.variant_spec("ASMIL", small=True)[1]["n_tokens"] == A.SMALL_ASMIL["n_tokens"]  # unchanged default
    for bad in ({"n_tokens": [4]}, {"drop_rates": [0.625]}, {"drop_rates": [0.9]}, {"drop_rates": [0.05]}):
        # the profile's own K, a rate dropping the profile's 2 of 4, all but none kept, none dropped
        with pytest.raises(ValueError, match="token_specs"):
            S.token_specs(bad.get("n_tokens", []), bad.get("drop_rates", []), lam=0.003, profile=(4, 0.5))


def test_token_table_and_the_drop_rate_claims(sweep):
    per_seed = sweep.per_seed()
    reference = S.asmil_name(0.1)
    fake = per_seed[per_seed["method"] == reference].assign(method=S.asmil_name(0.1, drop_rate=0.25))
    specs = S.token_specs([], [0.25], lam=0.1, profile=(4, 0.5))
    table = S.token_table(pd.concat([per_seed, fake]), specs, 0.1, profile=(4, 0.5))
    assert table[["K", "drop_rate", "n_drop"]].values.tolist() == [[4, 0.0, 0], [4, 0.25, 1], [4, 0.5, 2]]
    assert table["method"].tolist() == [S.asmil_name(0.1, token_drop=False), S.asmil_name(0.1, drop_rate=0.25),
                                        reference]  # the no-rd cell ran in the sweep fixture
    assert (table["n"] == 2).all()
    # the drop-rate claim row appears when that rate ran: here a copy of the reference under the rate's name
    import dataclasses

    name = S.asmil_name(0.1, drop_rate=0.25)
    copy = {f: pd.concat([getattr(sweep, f), getattr(sweep, f)[getattr(sweep, f)["method"] == reference].assign(method=name)])
            for f in ("runs", "predictions", "stability", "history", "localization")}
    claims = S.sweep_claims(dataclasses.replace(sweep, **copy), [0.1], 0.1, n_resamples=200,
                            drop_rates=[0.25, 0.6, 0.75])  # 0.6: inside the paper's peak, no claim; 0.75 did not run
    row = claims[claims["method_b"] == name]
    assert len(claims) == 8 and len(row) == 1 and row["difference"].iloc[0] == pytest.approx(0.0)
    assert row["claim"].iloc[0] == "ASMIL's drop rate 0.5 beats 0.25 (the rate peaks within 0.4-0.7)"
    with pytest.raises(ValueError, match="outside the paper's peak"):
        S.sweep_claims(sweep, [0.1], 0.1, drop_rates=[0.25], profile_rate=0.25)
