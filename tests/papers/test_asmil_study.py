"""The ASMIL study helpers (milstudy.papers.asmil): the feature-bag world, the run grid and its claims table."""

import numpy as np
import pandas as pd
import pytest

from milstudy.papers import asmil as A
from milstudy.train.two_stage import TrainConfig


@pytest.fixture(scope="module")
def data():
    return A.asmil_bags("smoke", seed=3, label_noise=0.3)


def test_label_noise_flips_only_training_labels(data):
    clean = A.asmil_bags("smoke", seed=3, label_noise=0.0)
    assert data.flipped and clean.flipped == []
    for split in ("train", "val", "test"):
        for noisy, truth in zip(data.bags[split], clean.bags[split]):
            assert noisy.slide_id == truth.slide_id
            flipped = noisy.slide_id in data.flipped
            assert (noisy.target != truth.target) == flipped
            assert not (flipped and split != "train")
            assert noisy.features.shape[1] == 32 and noisy.coords.shape == (len(noisy), 2)
    # the bags carry ground truth: instance labels agree with the clean slide label
    for bag in clean.bags["test"]:
        assert int(bag.instance_labels.max()) == int(bag.target)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="label_noise"):
        A.asmil_bags("smoke", label_noise=0.6)
    with pytest.raises(ValueError, match="unknown ASMIL study variant"):
        A.variant_spec("ABMIL + magic")
    assert A.variant_spec("ASMIL", small=True)[1]["n_tokens"] == A.SMALL_ASMIL["n_tokens"]
    assert A.variant_spec("ABMIL", small=True)[1] == {}


@pytest.fixture(scope="module")
def grid(data):
    config = TrainConfig(epochs=3, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    return A.run_dynamics(data, ["ABMIL", "ABMIL + anchor + NSF"], [0, 1], config, n_tracked=3, small=True,
                          progress=False)


def test_run_dynamics_returns_tidy_frames(grid, data):
    assert len(grid.runs) == 4 and set(grid.runs["method"]) == {"ABMIL", "ABMIL + anchor + NSF"}
    test_ids = {b.slide_id for b in data.bags["test"]}
    assert set(grid.predictions["slide_id"]) == test_ids
    tracked = {b.slide_id for b in data.bags["test"][:3]}
    assert set(grid.stability["slide_id"]) == tracked
    assert set(grid.stability["epoch"]) == {0, 1, 2, 3}
    per_slide = grid.per_slide()
    assert len(per_slide) == 4 * 3 and per_slide[["early_jsd", "late_jsd"]].notna().all().all()
    assert ((per_slide["late_jsd"] >= 0) & (per_slide["late_jsd"] <= np.log(2))).all()
    per_seed = grid.per_seed()
    assert {"test_auc", "test_f1_macro", "late_jsd", "late_entropy", "instance_auroc", "dice", "froc"} <= set(
        per_seed.columns)
    loc = grid.localization
    assert set(loc["slide_id"]) == test_ids and len(loc) == 4 * len(test_ids)
    assert loc.loc[loc["positive"], "instance_auroc"].between(0, 1).all()
    assert loc.loc[~loc["positive"], "instance_auroc"].isna().all()


def test_runs_are_deterministic_and_independent_of_the_worker_count(grid, data):
    config = TrainConfig(epochs=3, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    again = A.run_dynamics(data, ["ABMIL + anchor + NSF"], [1], config, n_tracked=3, small=True, workers=2,
                           progress=False)
    first = grid.stability[(grid.stability["method"] == "ABMIL + anchor + NSF") & (grid.stability["seed"] == 1)]
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.stability.reset_index(drop=True))


def test_dynamics_claims_has_the_rows_of_the_methods_that_ran(grid):
    table = A.dynamics_claims(grid, n_resamples=200)
    assert len(table) == 5  # ABMIL's halves; late JSD, F1, AUC and localization of ABMIL + anchor + NSF vs ABMIL
    assert table["metric"].tolist() == ["jsd", "late_jsd", "f1_macro", "auc", "instance_auroc"]
    assert set(table["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    assert (table["ci_low"] <= table["difference"]).all() and (table["difference"] <= table["ci_high"]).all()
    with pytest.raises(ValueError, match="none of the claims"):
        A.dynamics_claims(grid, methods=["ASMIL"])
    # late-JSD rows say how flat each side's late attention is (stabilisation needs matched entropy); others do not
    entropy = grid.per_slide().groupby("method")["late_entropy"].mean()
    row = table[table["metric"] == "late_jsd"].iloc[0]
    assert row["entropy_a"] == pytest.approx(entropy["ABMIL + anchor + NSF"])
    assert row["entropy_b"] == pytest.approx(entropy["ABMIL"])
    assert table.loc[table["metric"] != "late_jsd", ["entropy_a", "entropy_b"]].isna().all().all()


def test_attention_logits_of_gives_the_logits_of_the_models_attention(data):
    import torch

    from milstudy.models import build_model

    torch.manual_seed(0)
    model = build_model("asmil", 32, 2, **A.SMALL_ASMIL).train()
    logits = A.attention_logits_of(model, data.bags["test"][:2])  # eval mode inside: no token drop
    assert model.training  # the mode is restored
    model.eval()
    for bag in data.bags["test"][:2]:
        z = logits[bag.slide_id]
        assert z.shape == (A.SMALL_ASMIL["n_tokens"] * A.SMALL_ASMIL["heads"], len(bag))
        with torch.no_grad():
            attention = model(bag.features[None]).attention[0].double().numpy()
        np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(-1, keepdims=True), attention, atol=1e-6)


def test_per_slide_halves_split_the_epoch_steps(grid):
    stab = grid.stability
    one = stab[(stab["method"] == "ABMIL") & (stab["seed"] == 0)]
    sid = one["slide_id"].iloc[0]
    jsd = one[one["slide_id"] == sid].set_index("epoch")["jsd_next"]  # steps 0->1, 1->2, 2->3
    row = grid.per_slide().query("method == 'ABMIL' and seed == 0 and slide_id == @sid").iloc[0]
    assert row["early_jsd"] == pytest.approx(jsd[1])  # step 0 -> 1 left out; 2 steps: one per half
    assert row["late_jsd"] == pytest.approx(jsd[2])


def test_trained_targets_give_both_targets_per_seed_slide_and_temperature(data):
    targets = A.trained_targets(data, seeds=[0, 1], temperatures=[1.0, 2.0], epochs=1)
    n_test = len(data.bags["test"])
    assert len(targets) == 2 * n_test * 2 * 2
    assert set(targets["method"]) == {"NSF T=1", "NSF T=2", "softmax T=1", "softmax T=2"}
    assert (targets["log_top_ratio"] >= 0).all() and targets["normalized_entropy"].between(0, 1).all()


def test_s7_variants_train_and_report_the_learnt_mixture_weight(data):
    config = TrainConfig(epochs=2, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    names = ["ABMIL + entmax-1.5 anchor", "ABMIL + anchor + NSF, NSF online",
             "ABMIL + anchor + NSF, mixture online (Eq. 34)"]
    out = A.run_dynamics(data, names, [0, 1], config, n_tracked=2, small=True, progress=False)
    runs = out.runs[out.runs["seed"] == 0].set_index("method")
    assert runs["test_auc"].between(0, 1).all()
    alpha = runs["mixture_alpha"]
    assert alpha[names[:2]].isna().all() and 0 < alpha[names[2]] < 1 and alpha[names[2]] != 0.5  # rho moved
    with pytest.raises(ValueError, match="s7_table: needs"):
        A.s7_table(out)  # no reference run
    reference = A.run_dynamics(data, [A.S7_REFERENCE], [0, 1], config, n_tracked=2, small=True, progress=False)
    both = A.Dynamics(*(pd.concat([getattr(reference, f), getattr(out, f)], ignore_index=True)
                        for f in ("runs", "predictions", "stability", "history", "localization")))
    table = A.s7_table(both).set_index("method")
    assert list(table.index) == [A.S7_REFERENCE, *names]
    assert table.loc[A.S7_REFERENCE, "time_vs_reference_mean"] == pytest.approx(1.0)
    both_alphas = out.runs.loc[out.runs["method"] == names[2], "mixture_alpha"]
    assert table.loc[names[2], "mixture_alpha_mean"] == pytest.approx(both_alphas.mean())
    assert table.loc[names[0], "mixture_alpha"] == ""
    claims = A.dynamics_claims(both, n_resamples=200)
    assert "NSF in the online model lowers macro-F1" in " ".join(claims["claim"])


def test_matched_entropy_control_reads_the_uniform_family_at_the_anchors_entropy():
    family = ["ABMIL", "ABMIL + uniform target (λ = 0.1)", "ABMIL + uniform target"]
    rows = []
    for seed, shift in [(0, 1.0), (1, 2.0)]:
        rows += [{"method": family[0], "seed": seed, "late_entropy": 0.2, "late_jsd": 0.1 * shift},
                 {"method": family[2], "seed": seed, "late_entropy": 1.0, "late_jsd": 1e-4 * shift},
                 {"method": family[1], "seed": seed, "late_entropy": 0.6, "late_jsd": 0.01 * shift},  # any order
                 {"method": "anchor", "seed": seed, "late_entropy": 0.4, "late_jsd": 0.001},
                 {"method": "too sharp", "seed": seed, "late_entropy": 0.1, "late_jsd": 0.5}]
    matched = A.matched_entropy_control(pd.DataFrame(rows), ["anchor", "too sharp", "not run"], family)
    control = matched[matched["method"] == A.MATCHED_PREFIX + "anchor"].set_index("seed")
    for seed, shift in [(0, 1.0), (1, 2.0)]:  # halfway between 0.2 and 0.6: the geometric mean of the two JSDs
        assert control.loc[seed, "log_late_jsd"] == pytest.approx(np.log(np.sqrt(0.1 * 0.01) * shift))
        assert not control.loc[seed, "clamped"]
    own = matched[matched["method"] == "anchor"]
    assert own["log_late_jsd"].tolist() == pytest.approx([np.log(0.001)] * 2)
    outside = matched[matched["method"] == A.MATCHED_PREFIX + "too sharp"]
    assert outside["clamped"].all() and outside["log_late_jsd"].tolist() == pytest.approx(np.log([0.1, 0.2]))
    assert "not run" not in set(matched["method"])
    # one family member is no curve: nothing to match against
    lone = pd.DataFrame([r for r in rows if r["method"] in ("ABMIL", "anchor")])
    assert A.matched_entropy_control(lone, ["anchor"], family).empty


def test_per_slide_cuts_the_halves_per_run_so_runs_of_different_lengths_each_get_their_own():
    rows = []
    for method, epochs in [("short", 4), ("long", 8)]:
        for epoch in range(epochs + 1):  # epoch 0 -> 1 is left out; the rest split into halves
            rows.append({"method": method, "seed": 0, "slide_id": "s", "epoch": epoch,
                         "jsd_next": np.nan if epoch == epochs else float(epoch), "normalized_entropy": 0.5})
    result = A.Dynamics(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(rows), pd.DataFrame())
    per_slide = result.per_slide().set_index("method")
    assert per_slide.loc["short", "early_jsd"] == pytest.approx(1.5)  # steps 1, 2 | 3 (cut at round(1.5) = 2)
    assert per_slide.loc["short", "late_jsd"] == pytest.approx(3.0)  # (one cut over both runs: late = nothing)
    assert per_slide.loc["long", "early_jsd"] == pytest.approx(2.5)  # steps 1-4 | 5, 6, 7 (cut at round(3.5) = 4)
    assert per_slide.loc["long", "late_jsd"] == pytest.approx(6.0)


def test_config_overrides_change_one_variants_schedule_only(data):
    config = TrainConfig(epochs=2, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    grid = A.run_dynamics(data, ["ABMIL", "ASMIL without anchor"], [0], config, n_tracked=2, small=True,
                          progress=False, config_overrides={"ASMIL without anchor": {"epochs": 3}})
    epochs = grid.history.groupby("method")["epoch"].max()
    assert epochs["ABMIL"] == 2 and epochs["ASMIL without anchor"] == 3
    assert grid.stability.groupby("method")["epoch"].max().to_dict() == {"ABMIL": 2, "ASMIL without anchor": 3}
    with pytest.raises(ValueError, match="not run"):
        A.run_dynamics(data, ["ABMIL"], [0], config, config_overrides={"ASMIL": {"epochs": 3}}, progress=False)


def test_the_aem_control_has_no_anchor_and_only_the_entropy_term():
    import torch

    from milstudy.models import build_model

    registry, kwargs = A.variant_spec("ABMIL + AEM (β = 1)")
    model = build_model(registry, 8, 2, **kwargs).train()
    out = model(torch.randn(1, 12, 8))
    attention = out.attention.mean(1)[0]
    entropy = -(attention * attention.log()).sum()
    assert model.anchor is None and set(out.aux_losses) == {"aem"}
    torch.testing.assert_close(out.aux_losses["aem"], -entropy)
