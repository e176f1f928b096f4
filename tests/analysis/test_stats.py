"""milstudy.analysis.stats: closed forms, exact identities of the resampled metrics, coverage of the hierarchical
bootstrap on simulated seeds x slides, and the refusals on bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from sklearn.metrics import roc_auc_score

from milstudy.analysis import stats

VALUE = stats.Metric("value", (), ("value",), lambda f: float(f["value"].mean()),
                     lambda f: (f["value"].to_numpy(float),), kind="mean", bounds=None, chance=None)


def predictions(n_seeds=5, n_slides=40, shift=1.0, seed=0, ties=False) -> pd.DataFrame:
    """Binary test predictions of methods A (better by ``shift``) and B on the same slides for every seed."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n_slides) % 2).astype(int)
    frames = []
    for method, gain in (("A", shift), ("B", 0.0)):
        for s in range(n_seeds):
            score = rng.normal(size=n_slides) + (0.5 + gain) * y
            if ties:
                score = np.round(score, 0)
            frames.append(pd.DataFrame({"method": method, "seed": s, "slide_id": [f"s{i:02d}" for i in range(n_slides)],
                                        "target": y, "prob_1": score}))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------- seed summary
def test_seed_summary_is_the_student_t_interval_with_ddof_1():
    values = [0.81, 0.84, 0.79, 0.86, 0.83]
    mean, sd, low, high, n = stats.seed_summary(values)
    assert n == 5 and mean == pytest.approx(0.826)
    assert sd == pytest.approx(np.std(values, ddof=1))
    half = 2.7764451051977987 * sd / np.sqrt(5)  # t_{4, 0.975}
    assert (low, high) == pytest.approx((mean - half, mean + half))
    expected = st.ttest_1samp(values, 0).confidence_interval(0.95)
    assert (low, high) == pytest.approx((expected.low, expected.high))


@pytest.mark.parametrize("values, message", [([0.8], "at least 2"), ([0.8, np.nan, 0.7], "NaN"), ([], "at least 2")])
def test_seed_summary_refuses_too_few_seeds_and_nan(values, message):
    with pytest.raises(ValueError, match=message):
        stats.seed_summary(values, name="test_auc")


# ------------------------------------------------------------------------------- resampled metrics = sklearn
def test_resampled_auc_equals_sklearn_on_each_resampled_frame():
    frame = predictions(n_seeds=1, n_slides=25, ties=True).query("method == 'A'").reset_index(drop=True)
    metric = stats.auc_metric()
    assert metric(frame) == pytest.approx(roc_auc_score(frame["target"], frame["prob_1"]))
    rng = np.random.default_rng(3)
    counts = rng.multinomial(25, np.full(25, 1 / 25), size=30)
    fast = metric.resampled(frame, counts)
    for c, value in zip(counts, fast):
        rows = frame.iloc[np.repeat(np.arange(25), c)]
        if rows["target"].nunique() < 2:
            assert np.isnan(value)
        else:
            assert value == pytest.approx(roc_auc_score(rows["target"], rows["prob_1"]), abs=1e-12)
    assert metric.resampled(frame, np.ones((1, 25), int))[0] == pytest.approx(metric(frame), abs=1e-12)


def three_class_frame(n_slides=30, seed=5, gain=1.0) -> pd.DataFrame:
    """Softmax probabilities over 3 classes (rounded logits: tied scores), the true class favoured by ``gain``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_slides) % 3
    logits = np.round(rng.normal(size=(n_slides, 3)) + gain * np.eye(3)[y], 1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return pd.DataFrame({"target": y, **{f"prob_{k}": p[:, k] for k in range(3)}})


def test_resampled_macro_auc_equals_sklearn_ovr_on_each_resampled_frame():
    frame = three_class_frame()
    metric = stats.macro_auc_metric(3)
    probs = frame[["prob_0", "prob_1", "prob_2"]].to_numpy()
    assert metric(frame) == pytest.approx(roc_auc_score(frame["target"], probs, multi_class="ovr", average="macro"))
    rng = np.random.default_rng(4)
    counts = rng.multinomial(30, np.full(30, 1 / 30), size=30)
    counts[0] = np.where(frame["target"] == 2, 0, 2)  # one resample without class 2: undefined
    fast = metric.resampled(frame, counts)
    assert np.isnan(fast[0])
    for c, value in zip(counts[1:], fast[1:]):
        rows = frame.iloc[np.repeat(np.arange(30), c)]
        expected = roc_auc_score(rows["target"], rows[["prob_0", "prob_1", "prob_2"]].to_numpy(),
                                 multi_class="ovr", average="macro")
        assert value == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="binary: auc_metric"):
        stats.macro_auc_metric(2)
    with pytest.raises(ValueError, match="class indices 0..2"):
        metric.prepare(frame.assign(target=frame["target"] + 1))


def test_resampled_c_index_equals_scikit_survival_with_tied_times_and_risks():
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"time": rng.integers(1, 8, 30).astype(float), "event": rng.random(30) < 0.6,
                          "risk": np.round(rng.normal(size=30), 1)})
    metric = stats.c_index_metric()
    counts = rng.multinomial(30, np.full(30, 1 / 30), size=20)
    for c, value in zip(counts, metric.resampled(frame, counts)):
        rows = frame.iloc[np.repeat(np.arange(30), c)]
        expected = concordance_index_censored(rows["event"].to_numpy(), rows["time"].to_numpy(), rows["risk"].to_numpy())[0]
        assert value == pytest.approx(expected, abs=1e-12)


def test_resampled_accuracy_is_the_weighted_share_correct():
    frame = pd.DataFrame({"target": [0, 1, 1, 0], "prediction": [0, 1, 0, 1]})
    counts = np.array([[4, 0, 0, 0], [0, 0, 2, 2], [1, 1, 1, 1]])
    np.testing.assert_allclose(stats.accuracy_metric().resampled(frame, counts), [1.0, 0.0, 0.5])


# -------------------------------------------------------------------------------------- paired bootstrap
def test_identical_methods_give_zero_difference_and_p_one():
    df = predictions()
    b = df[df["method"] == "B"].assign(method="A2", prob_1=lambda f: np.exp(f["prob_1"]))  # monotone: same AUC
    diff = stats.paired_bootstrap(pd.concat([df, b]), "A2", "B", stats.auc_metric(), n_resamples=500)
    assert diff.difference == pytest.approx(0.0, abs=1e-12)
    assert diff.ci_low == pytest.approx(0.0, abs=1e-12) and diff.ci_high == pytest.approx(0.0, abs=1e-12)
    assert diff.p_value == 1.0


def test_bootstrap_point_estimate_interval_and_determinism():
    df = predictions()
    diff = stats.paired_bootstrap(df, "A", "B", stats.auc_metric())
    per_seed = {m: [roc_auc_score(g["target"], g["prob_1"]) for _, g in df[df.method == m].groupby("seed")]
                for m in "AB"}
    assert diff.difference == pytest.approx(np.mean(per_seed["A"]) - np.mean(per_seed["B"]))
    assert diff.n_seeds == 5 and diff.n_slides == 40 and diff.draws.size == 2000
    assert diff.ci_low < diff.difference < diff.ci_high and diff.ci_low > 0  # A is clearly better
    assert "crossed" in diff.interval_method  # same slides in every seed
    again = stats.paired_bootstrap(df, "A", "B", stats.auc_metric())
    np.testing.assert_array_equal(diff.draws, again.draws)
    assert diff.se == pytest.approx(diff.draws.std(ddof=1))
    wider = diff.interval(0.99)
    assert wider[0] <= diff.ci_low and wider[1] >= diff.ci_high


def test_interval_and_p_are_dual():
    diff = stats.paired_bootstrap(predictions(shift=0.25, seed=2), "A", "B", stats.auc_metric(), n_resamples=1000)
    assert 0 < diff.p_value < 1
    for gamma in (0.5 * diff.p_value, 0.999 * diff.p_value, 1.001 * diff.p_value, 2 * diff.p_value):
        low, high = diff.interval(1 - min(gamma, 0.99))
        assert (low > 0 or high < 0) == (diff.p_value < gamma)


def test_generic_frame_function_gives_the_same_draws_as_the_fast_metric():
    df = predictions(n_seeds=3, n_slides=12).rename(columns={"prob_1": "value"})
    fast = stats.paired_bootstrap(df, "A", "B", VALUE, n_resamples=100, design="nested")
    generic = stats.paired_bootstrap(df, "A", "B", lambda f: float(f["value"].mean()), n_resamples=100,
                                     design="nested")
    np.testing.assert_allclose(fast.draws, generic.draws, atol=1e-12)


def _simulated(rng, n_seeds=8, n_slides=30, delta=0.2) -> pd.DataFrame:
    """Per-slide values: method mean + seed effect (training) + slide x method effect shared by all seeds (the
    same test slides) + noise. The true difference of the expected metric is ``delta``."""
    frames = []
    for method, mu in (("A", delta), ("B", 0.0)):
        slide_effect = rng.normal(0, 1.0, n_slides)
        for s in range(n_seeds):
            frames.append(pd.DataFrame({"method": method, "seed": s, "slide_id": np.arange(n_slides),
                                        "value": mu + rng.normal(0, 0.3) + slide_effect + rng.normal(0, 0.5, n_slides)}))
    return pd.concat(frames, ignore_index=True)


def test_coverage_on_simulated_seeds_and_shared_test_slides():
    """95 % intervals cover the true difference ~95 % of the time with the crossed resampling (auto for shared
    slides); resampling slides anew for every seed shrinks the test-set variance and undercovers."""
    rng = np.random.default_rng(1)
    hits = {"crossed": 0, "nested": 0}
    n = 100
    for k in range(n):
        df = _simulated(rng)
        for design in hits:
            d = stats.paired_bootstrap(df, "A", "B", VALUE, n_resamples=400, design=design, seed=k)
            hits[design] += d.ci_low <= 0.2 <= d.ci_high
    assert 0.88 <= hits["crossed"] / n <= 1.0
    assert hits["nested"] / n < 0.85


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df[~((df.method == "B") & (df.seed == 4))], "seeds are not matched"),
    (lambda df: df[~((df.method == "B") & (df.seed == 1) & (df.slide_id == "s03"))], "different test slides"),
    (lambda df: df.assign(prob_1=df.prob_1.where(df.index != 7)), "NaN in column"),
    (lambda df: df[df.seed == 0], "at least 2"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "several rows"),
    (lambda df: df.assign(target=np.where((df.method == "B") & (df.index % 40 == 5), 1 - df.target, df.target)),
     "'target' differs"),
    (lambda df: df.drop(columns="prob_1"), "lacks column"),
    (lambda df: df.assign(method=df.method.replace("A", "C")), "method_a='A' has no rows"),
])
def test_bad_predictions_are_refused_with_the_argument_named(mutate, message):
    with pytest.raises(ValueError, match=message):
        stats.paired_bootstrap(mutate(predictions()), "A", "B", stats.auc_metric(), n_resamples=200)


def test_nested_design_for_different_slides_per_seed():
    df = predictions()
    df.loc[df.seed == 3, "slide_id"] = "other_" + df.loc[df.seed == 3, "slide_id"]
    diff = stats.paired_bootstrap(df, "A", "B", stats.auc_metric(), n_resamples=300)
    assert "nested" in diff.interval_method
    with pytest.raises(ValueError, match="same test slides in every seed"):
        stats.paired_bootstrap(df, "A", "B", stats.auc_metric(), n_resamples=300, design="crossed")


# --------------------------------------------------------------------------------------- paired t (scalars)
def test_paired_t_matches_the_closed_form_and_the_per_seed_table():
    a, b = np.array([0.9, 0.85, 0.88, 0.92, 0.87]), np.array([0.86, 0.84, 0.83, 0.9, 0.86])
    d = a - b
    diff = stats.paired_t(a, b)
    half = st.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert diff.p_value == pytest.approx(2 * st.t.sf(abs(d.mean()) / (d.std(ddof=1) / np.sqrt(5)), 4))
    assert diff.mde() == pytest.approx((st.t.ppf(0.975, 4) + st.t.ppf(0.8, 4)) * diff.se)
    low, high = diff.interval(1 - diff.p_value)  # the interval at level 1 - p just touches 0
    assert min(abs(low), abs(high)) == pytest.approx(0.0, abs=1e-12)
    table = pd.DataFrame({"method": ["A"] * 5 + ["B"] * 5, "seed": [3, 1, 2, 0, 4] * 2,
                          "auc": [a[3], a[1], a[2], a[0], a[4], b[3], b[1], b[2], b[0], b[4]]})
    from_table = stats.paired_seed_difference(table, "A", "B", "auc")
    assert from_table.difference == pytest.approx(d.mean()) and from_table.seeds == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="seeds are not matched"):
        stats.paired_seed_difference(table.iloc[:-1], "A", "B", "auc")
    with pytest.raises(ValueError, match="values_a has 5 seeds but values_b has 4"):
        stats.paired_t(a, b[:4])


# ---------------------------------------------------------------------------------------- sign flip, Holm
def test_sign_flip_exact_p_values():
    assert stats.sign_flip_test([0.1, 0.2, 0.05, 0.3, 0.15, 0.12]) == pytest.approx(2 / 64)
    assert stats.sign_flip_test([0.1, 0.2, 0.05, 0.3, 0.15, 0.12], alternative="greater") == pytest.approx(1 / 64)
    d = np.array([0.3, -0.1, 0.25, 0.05, -0.02, 0.2, 0.1])
    flips = np.array(list(itertools.product([1, -1], repeat=7)))
    brute = np.mean(np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    assert stats.sign_flip_test(d) == pytest.approx(brute)


def test_sign_flip_refuses_five_seeds_saying_why():
    with pytest.raises(ValueError, match=r"needs >= 6 seeds, got 5.*1/16"):
        stats.sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5])


def test_holm_textbook_example_and_properties():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])  # R p.adjust
    out = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])
    p = np.random.default_rng(0).random(12) ** 3
    adjusted = stats.holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and adjusted.max() <= 1
    assert stats.holm([0.3]) == pytest.approx([0.3])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        stats.holm([0.5, 1.2])


def test_minimum_detectable_effect_closed_form_and_power():
    mde = stats.minimum_detectable_effect(1.0)
    assert mde == pytest.approx(2.8016, abs=1e-4)
    z = st.norm.ppf(0.975)
    power = st.norm.sf(z - mde) + st.norm.cdf(-z - mde)  # two-sided test at a true effect of MDE
    assert power == pytest.approx(0.8, abs=1e-3)
    assert stats.minimum_detectable_effect(0.02, df=4) == pytest.approx(0.02 * 3.7175, abs=1e-4)
    with pytest.raises(ValueError, match="se must be"):
        stats.minimum_detectable_effect(float("nan"))
