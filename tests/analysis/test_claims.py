"""milstudy.analysis.claims: verdicts follow the (Holm-widened) interval, rows are scored from predictions or
per-seed metrics, the table saves through the runner, and the prose is computed from the row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milstudy.analysis import claims as C
from milstudy.analysis import stats


def predictions(n_seeds=5, n_slides=40, gains=(("A", 1.0), ("B", 0.0), ("Z", -1.0)), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (np.arange(n_slides) % 2).astype(int)
    frames = []
    for method, gain in gains:
        for s in range(n_seeds):
            frames.append(pd.DataFrame({"method": method, "seed": s, "slide_id": np.arange(n_slides), "target": y,
                                        "prob_1": rng.normal(size=n_slides) + (0.7 + gain) * y}))
    return pd.concat(frames, ignore_index=True)


def per_seed(n_seeds=5) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for method, risk in (("A", 0.2), ("B", 0.5), ("Z", 0.5)):
        for s in range(n_seeds):
            rows.append({"method": method, "seed": s, "risk": risk + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


CLAIMS = [
    C.Claim("A beats B", "A", "B", "auc", "greater", 93.97, 89.23, "AUC, %", source="Table 1"),
    C.Claim("B beats A", "B", "A", "auc", "greater", source="Sec. 3"),
    C.Claim("A has lower risk than B", "A", "B", "risk", "less"),
    C.Claim("B equals Z in risk (paper: B > Z)", "B", "Z", "risk", "greater"),
]


def test_verdicts_and_columns():
    table = C.claims_table(CLAIMS, predictions=predictions(), per_seed=per_seed())
    assert list(table.columns) == list(C.COLUMNS) and len(table) == 4
    assert table["verdict"].tolist() == ["supported", "contradicted", "supported", "inconclusive"]
    assert table.loc[0, "paper"] == "93.97 vs 89.23 (AUC, %)" and table.loc[0, "paper_difference"] == pytest.approx(4.74)
    assert table.loc[1, "paper"] == "claimed (Sec. 3)" and table.loc[0, "direction"] == "A > B"
    assert table.loc[0, "interval"].startswith("hierarchical bootstrap") and table.loc[2, "interval"].startswith("paired t")
    assert table.loc[0, "n_slides"] == 40 and np.isnan(table.loc[2, "n_slides"]) and (table["n_seeds"] == 5).all()
    # B - A is exactly minus A - B on the same resamples
    assert table.loc[1, "difference"] == pytest.approx(-table.loc[0, "difference"])
    assert table.loc[1, "ci_low"] == pytest.approx(-table.loc[0, "ci_high"])
    assert (table["mde"] > 0).all()
    assert table["p_sign_flip"].isna().all() and "needs >= 6 seeds (have 5)" in table.loc[0, "note"]


def test_holm_widens_the_verdict_interval_and_verdict_equals_p_holm_rule():
    table = C.claims_table(CLAIMS, predictions=predictions(), per_seed=per_seed())
    np.testing.assert_allclose(table["p_holm"], stats.holm(table["p"]))
    assert (table["verdict_level"] >= 0.95 - 1e-12).all()
    assert (table["verdict_ci_low"] <= table["ci_low"] + 1e-12).all()
    assert (table["verdict_ci_high"] >= table["ci_high"] - 1e-12).all()
    decided = table["verdict"] != "inconclusive"
    assert (decided == (table["p_holm"] < 0.05)).all()


def test_holm_can_turn_a_marginal_row_inconclusive():
    """A difference whose own 95 % interval excludes 0 but not once several claims share the table."""
    for k in range(50):  # find a seed where the unadjusted verdict is "supported" with 0.0125 < p < 0.05
        preds = predictions(gains=(("A", 0.35), ("B", 0.0)), seed=k)
        one = C.claims_table([CLAIMS[0]], predictions=preds)
        if one.loc[0, "verdict"] == "supported" and 0.0125 < one.loc[0, "p"] < 0.05:
            break
    else:
        pytest.fail("no marginal example found")
    assert one.loc[0, "verdict_level"] == pytest.approx(0.95)
    assert one.loc[0, "verdict_ci_low"] == pytest.approx(one.loc[0, "ci_low"])
    others = [C.Claim(f"null {i}", "A", "B", "risk", "greater") for i in range(3)]
    flat = pd.DataFrame([{"method": m, "seed": s, "risk": 0.5 + 0.01 * ((s * 7 + i) % 3)} for m in "AB"
                         for s in range(5) for i in [0]])
    flat.loc[flat.method == "B", "risk"] = flat.loc[flat.method == "B", "risk"].to_numpy()[::-1]
    table = C.claims_table([CLAIMS[0], *others], predictions=preds, per_seed=flat)
    assert table.loc[0, "difference"] == pytest.approx(one.loc[0, "difference"])  # same RNG, same row
    assert table.loc[0, "ci_low"] == pytest.approx(one.loc[0, "ci_low"])
    assert table.loc[0, "verdict"] == "inconclusive" and table.loc[0, "verdict_ci_low"] < 0 < table.loc[0, "ci_low"]
    unadjusted = C.claims_table([CLAIMS[0], *others], predictions=preds, per_seed=flat, holm_adjust=False)
    assert unadjusted.loc[0, "verdict"] == "supported"


def test_sign_flip_reported_with_six_seeds():
    table = C.claims_table(CLAIMS[2:3], per_seed=per_seed(n_seeds=6))
    assert table.loc[0, "p_sign_flip"] == pytest.approx(2 / 64)  # all 6 differences negative
    assert table.loc[0, "note"] == ""


def test_custom_metric_and_mapping_of_prediction_frames():
    preds = predictions()
    surv = preds.rename(columns={"prob_1": "risk"}).assign(time=lambda f: 10.0 - 5 * f["target"], event=True)
    claims = [C.Claim("A beats B", "A", "B", "auc"), C.Claim("A ranks risk better", "A", "B", "c_index"),
              C.Claim("A has higher mean score", "A", "B", "score_mean")]
    mean_score = stats.Metric("score_mean", (), ("prob_1",), lambda f: float(f["prob_1"].mean()),
                              lambda f: (f["prob_1"].to_numpy(float),), kind="mean", bounds=None, chance=None)
    table = C.claims_table(claims, predictions={"auc": preds, "c_index": surv, "score_mean": preds},
                           metrics={"score_mean": mean_score}, n_resamples=500)
    assert table["metric"].tolist() == ["auc", "c_index", "score_mean"]
    assert table.loc[1, "mean_a"] == pytest.approx(table.loc[0, "mean_a"])  # two-time survival = AUC here


def test_bad_claims_and_inputs():
    with pytest.raises(ValueError, match="direction must be"):
        C.Claim("x", "A", "B", "auc", "higher")
    with pytest.raises(ValueError, match="both 'A'"):
        C.Claim("x", "A", "A", "auc")
    with pytest.raises(ValueError, match="neither scorable"):
        C.claims_table([C.Claim("x", "A", "B", "sparsity")], predictions=predictions(), per_seed=per_seed())
    with pytest.raises(ValueError, match="claims is empty"):
        C.claims_table([], per_seed=per_seed())
    with pytest.raises(ValueError, match="seeds are not matched"):
        C.claims_table(CLAIMS[2:3], per_seed=per_seed().query("not (method == 'B' and seed == 2)"))


def test_verdict_sentence_is_computed_from_the_row():
    table = C.claims_table(CLAIMS, predictions=predictions(), per_seed=per_seed())
    text = C.verdict_sentence(table.iloc[0])
    row = table.iloc[0]
    assert text.startswith("Supported: A beats B.")
    assert f"{row['difference']:+.3g}" in text and f"{row['ci_low']:+.3g}" in text and "95 % CI" in text
    assert "5 seeds × 40 test slides" in text and "Paper: 93.97 vs 89.23 (AUC, %)." in text
    inconclusive = C.verdict_sentence(table.iloc[3])
    assert inconclusive.startswith("Inconclusive") and f"{table.loc[3, 'mde']:.2g}" in inconclusive
    assert "contains 0" in inconclusive
    assert "against the paper" in C.verdict_sentence(table.iloc[1])
    with pytest.raises(ValueError, match="row lacks"):
        C.verdict_sentence({"claim": "x"})


def test_save_claims_writes_csv_and_markdown(tmp_path, monkeypatch):
    from milstudy import runner

    monkeypatch.setenv(runner.ENV_OUTPUT_DIR, str(tmp_path))
    table = C.claims_table(CLAIMS[2:], per_seed=per_seed())
    path = C.save_claims(table)
    assert path == tmp_path / "claims.csv"
    back = pd.read_csv(path)
    assert back["verdict"].tolist() == table["verdict"].tolist()
    assert back["difference"].to_numpy() == pytest.approx(table["difference"].to_numpy())
    markdown = (tmp_path / "claims.md").read_text()
    assert markdown.startswith("|") and "inconclusive" in markdown
    with pytest.raises(ValueError, match="table lacks"):
        C.save_claims(pd.DataFrame({"a": [1]}))


def test_auc_claims_on_three_class_predictions_use_the_macro_one_vs_rest_auc():
    rng = np.random.default_rng(2)
    y = np.arange(45) % 3
    frames = []
    for method, gain in (("A", 2.0), ("B", 0.3)):
        for s in range(5):
            logits = rng.normal(size=(45, 3)) + gain * np.eye(3)[y]
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            frames.append(pd.DataFrame({"method": method, "seed": s, "slide_id": np.arange(45), "target": y,
                                        **{f"prob_{k}": p[:, k] for k in range(3)}}))
    frame = pd.concat(frames, ignore_index=True)
    row = C.claims_table([C.Claim("A beats B", "A", "B", "auc")], predictions=frame, n_resamples=300).iloc[0]
    macro = stats.macro_auc_metric(3)
    per_method = frame.groupby(["method", "seed"]).apply(macro).groupby("method").mean()
    assert row["mean_a"] == pytest.approx(per_method["A"]) and row["mean_b"] == pytest.approx(per_method["B"])
    assert row["verdict"] == "supported" and row["interval"].startswith("hierarchical bootstrap")
