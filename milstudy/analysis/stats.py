"""Statistics over seeds and test slides for the claims mechanism (project issue "Claims with intervals").

Pure functions on arrays and DataFrames; nothing trains. Every claim of every notebook goes through these:

- ``seed_summary(values)``: mean, sd (ddof = 1), Student-t 95 % interval over seeds, n (refuses n < 2).
- ``Metric`` (``auc_metric``, ``c_index_metric``, ``accuracy_metric``): a slide-level metric that the bootstrap
  evaluates on resampled slides from per-seed arrays, without rebuilding a DataFrame per resample.
- ``paired_bootstrap(predictions, a, b, metric)``: difference of method ``a`` minus ``b`` on matched seeds and the
  same test slides, with a hierarchical (seeds, then slides) percentile bootstrap interval.
- ``paired_seed_difference(per_seed, a, b, column)``: the same from per-seed scalar metrics only (paired t).
- ``sign_flip_test(differences)``: exact randomisation test on matched per-seed differences (>= 6 seeds).
- ``holm(p_values)``: Holm's step-down adjustment across the rows of one table.
- ``minimum_detectable_effect(se)``: the smallest true difference a design detects with 80 % power.

Example::

    from milstudy.analysis import stats
    stats.seed_summary([0.81, 0.84, 0.79, 0.86, 0.83])        # SeedSummary(mean=0.826, sd=0.027, ...)
    diff = stats.paired_bootstrap(predictions, "ABMILX", "ABMIL", stats.auc_metric())
    diff.difference, diff.ci_low, diff.ci_high, diff.p_value, diff.mde()
    stats.holm([0.01, 0.04, 0.03, 0.005])                       # [0.03, 0.06, 0.06, 0.02]

``predictions`` is long: one row per (method, seed, slide) with ``method``, ``seed``, ``slide_id`` and the metric's
target and score columns (e.g. ``target, prob_1`` as the trainers write them, or ``time, event, risk``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
from scipy import stats as st

from milstudy.analysis._arrays import to_numpy
from milstudy.analysis.resampled_metrics import (Metric, _concordance, _resampled_from_arrays,  # noqa: F401
                                                 accuracy_metric, auc_metric, c_index_metric, macro_auc_metric)

MIN_SEEDS_SIGN_FLIP = 6
_EXACT_SIGN_FLIP_MAX = 16  # 2**16 sign vectors enumerated; more seeds -> 100 000 random sign vectors


# ------------------------------------------------------------------------------------------------ seeds
@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds with its Student-t interval. Unpacks as ``mean, sd, low, high, n = seed_summary(v)``."""

    mean: float
    sd: float
    ci_low: float
    ci_high: float
    n: int
    level: float = 0.95

    def __iter__(self) -> Iterator[float]:
        return iter((self.mean, self.sd, self.ci_low, self.ci_high, self.n))

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def _finite_vector(values: Any, name: str, min_n: int = 1) -> np.ndarray:
    v = to_numpy(values).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or inf ({int((~np.isfinite(v)).sum())} of {v.size} values); "
                         "drop undefined runs explicitly and say so, or fix the metric")
    if v.size < min_n:
        raise ValueError(f"{name} has {v.size} value(s); need at least {min_n} seeds")
    return v


def seed_summary(values: Any, level: float = 0.95, name: str = "values") -> SeedSummary:
    """Mean, sample sd (ddof = 1) and the Student-t interval ``mean ± t_{n-1, (1+level)/2} · sd / sqrt(n)`` of
    one metric over ``n`` seeds (``values [n]``). Refuses n < 2 (no spread, no interval) and NaN."""
    v = _finite_vector(values, name, min_n=2)
    _check_level(level)
    mean, sd = float(v.mean()), float(v.std(ddof=1))
    half = float(st.t.ppf((1 + level) / 2, v.size - 1)) * sd / np.sqrt(v.size)
    return SeedSummary(mean, sd, mean - half, mean + half, int(v.size), level)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")


# ----------------------------------------------------------------------------------- paired differences
@dataclass(frozen=True)
class PairedDifference:
    """Method ``a`` minus method ``b`` on matched seeds: the estimate, its interval and what went into it.

    ``difference = mean_a - mean_b`` (means over seeds of the per-seed metric on all test slides);
    ``seed_a, seed_b [n_seeds]``: the per-seed metrics in ``seeds`` order; ``draws``: the bootstrap distribution of
    the difference (None for the t-interval); ``p_value``: two-sided, dual to the interval (the interval at level
    1 - γ excludes 0 exactly when ``p_value < γ``); ``se``: standard error of the difference.
    """

    method_a: str
    method_b: str
    metric: str
    seeds: tuple
    seed_a: np.ndarray
    seed_b: np.ndarray
    ci_low: float
    ci_high: float
    level: float
    se: float
    p_value: float
    interval_method: str
    n_slides: int | None = None
    draws: np.ndarray | None = field(default=None, repr=False)
    n_skipped: int = 0

    @property
    def mean_a(self) -> float:
        return float(np.mean(self.seed_a))

    @property
    def mean_b(self) -> float:
        return float(np.mean(self.seed_b))

    @property
    def difference(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def seed_differences(self) -> np.ndarray:
        return self.seed_a - self.seed_b

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def interval(self, level: float) -> tuple[float, float]:
        """The interval at another confidence ``level`` (same method), e.g. a Holm-widened one."""
        _check_level(level)
        if self.draws is not None:
            return _percentile_interval(self.draws, level)
        d = self.seed_differences
        half = float(st.t.ppf((1 + level) / 2, d.size - 1)) * self.se
        return self.difference - half, self.difference + half

    def mde(self, alpha: float = 0.05, power: float = 0.8) -> float:
        """Minimum detectable effect of this design (:func:`minimum_detectable_effect` of ``se``); t quantiles
        with n_seeds - 1 degrees of freedom for the paired t, normal quantiles for the bootstrap."""
        df = None if self.draws is not None else self.n_seeds - 1
        return minimum_detectable_effect(self.se, alpha, power, df)


def _percentile_interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval: the k-th smallest and k-th largest draw, k = ceil(R (1 - level) / 2).

    With this order-statistic rule the interval excludes 0 exactly when :func:`_bootstrap_p` < 1 - level.
    """
    d = np.sort(np.asarray(draws, dtype=np.float64))
    k = max(1, int(np.ceil(d.size * (1 - level) / 2)))
    k = min(k, (d.size + 1) // 2)
    return float(d[k - 1]), float(d[d.size - k])


def _bootstrap_p(draws: np.ndarray) -> float:
    """Two-sided percentile-bootstrap p of "difference = 0": 2 min(#{d* <= 0}, #{d* >= 0}) / R, capped at 1."""
    d = np.asarray(draws)
    return float(min(1.0, 2 * min(np.sum(d <= 0), np.sum(d >= 0)) / d.size))


def _per_seed_frames(predictions: pd.DataFrame, method_a: str, method_b: str, columns: Sequence[str],
                     targets: Sequence[str], method_column: str, seed_column: str, slide_column: str,
                     ) -> tuple[list, dict[str, list[pd.DataFrame]]]:
    """Validate the long predictions frame; per method, one frame per seed with rows in the same slide order."""
    need = [method_column, seed_column, slide_column, *columns]
    missing = [c for c in need if c not in predictions]
    if missing:
        raise ValueError(f"predictions lacks column(s) {missing}; it has {list(predictions.columns)}")
    if method_a == method_b:
        raise ValueError(f"method_a and method_b are both {method_a!r}; compare two different methods")
    frames: dict[str, pd.DataFrame] = {}
    for m, arg in ((method_a, "method_a"), (method_b, "method_b")):
        part = predictions[predictions[method_column] == m]
        if part.empty:
            raise ValueError(f"{arg}={m!r} has no rows in predictions[{method_column!r}]; methods there: "
                             f"{sorted(map(str, predictions[method_column].unique()))}")
        bad = [c for c in columns if part[c].isna().any()]
        if bad:
            raise ValueError(f"predictions of {m!r} contain NaN in column(s) {bad}; an undefined prediction "
                             "cannot be scored")
        dup = part.duplicated([seed_column, slide_column])
        if dup.any():
            s, sl = part.loc[dup, [seed_column, slide_column]].iloc[0]
            raise ValueError(f"predictions of {m!r} have several rows for seed {s!r}, slide {sl!r}; "
                             "one row per (method, seed, slide) (filter to the test split)")
        frames[m] = part
    seeds_a, seeds_b = (set(frames[m][seed_column].unique()) for m in (method_a, method_b))
    if seeds_a != seeds_b:
        raise ValueError(f"seeds are not matched between methods: only {method_a!r} has {sorted(seeds_a - seeds_b)}, "
                         f"only {method_b!r} has {sorted(seeds_b - seeds_a)} (column {seed_column!r}); a paired "
                         "difference needs the same seeds for both")
    seeds = sorted(seeds_a)
    if len(seeds) < 2:
        raise ValueError(f"predictions have {len(seeds)} seed(s) (column {seed_column!r}); an interval that includes "
                         "seed variance needs at least 2 (better 5+)")
    out: dict[str, list[pd.DataFrame]] = {method_a: [], method_b: []}
    for s in seeds:
        fa = frames[method_a][frames[method_a][seed_column] == s].set_index(slide_column)
        fb = frames[method_b][frames[method_b][seed_column] == s].set_index(slide_column)
        if set(fa.index) != set(fb.index):
            raise ValueError(f"seed {s!r}: methods were scored on different test slides ({len(fa)} vs {len(fb)}; "
                             f"e.g. {sorted(set(fa.index) ^ set(fb.index))[:3]}); use the same test slides")
        order = sorted(fa.index)
        fa, fb = fa.loc[order], fb.loc[order]
        for t in targets:
            differ = fa[t].to_numpy() != fb[t].to_numpy()
            if differ.any():
                raise ValueError(f"seed {s!r}, slide {order[int(np.argmax(differ))]!r}: column {t!r} differs "
                                 f"between {method_a!r} and {method_b!r}; targets must be the same")
        out[method_a].append(fa.reset_index())
        out[method_b].append(fb.reset_index())
    return seeds, out


def paired_bootstrap(
    predictions: pd.DataFrame,
    method_a: str,
    method_b: str,
    metric: Metric | Callable[[pd.DataFrame], float],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    design: Literal["auto", "nested", "crossed"] = "auto",
    method_column: str = "method",
    seed_column: str = "seed",
    slide_column: str = "slide_id",
) -> PairedDifference:
    """Difference ``metric(a) - metric(b)`` averaged over matched seeds, with a hierarchical bootstrap interval.

    Observed: per seed, the metric of each method on all its test slides; the difference of the seed means.
    Hierarchical (two-stage) bootstrap (Davison & Hinkley 1997, Sec. 3.8; Field & Welsh 2007): each of
    ``n_resamples`` replicates draws the seeds with replacement, then the test slides with replacement, recomputes
    the metric of *both* methods on the *same* resampled slides of each drawn seed, averages over the drawn seeds
    and takes the difference. The interval is the percentile interval of these differences, so it includes
    seed-to-seed (training) variance and test-slide sampling variance. How slides are drawn:

    - ``"nested"``: new slides for every drawn seed (each seed its own test set, e.g. CV folds or resplits).
    - ``"crossed"``: one slide draw per replicate shared by all drawn seeds (the pigeonhole bootstrap of
      Owen 2007): right when every seed is scored on the *same* test slides, because then the test-set
      variance does not average out over seeds; nested resampling would shrink it by the number of seeds.
    - ``"auto"`` (default): crossed when every seed has the same slide ids, nested otherwise.

    Replicates where the metric is undefined on a drawn seed (e.g. one class only) are dropped and counted in
    ``n_skipped``. ``metric``: a :class:`Metric` (fast: matrix products on per-seed arrays), or any
    ``f(frame) -> float`` (generic, one call per resampled seed: slow, use a few hundred resamples).
    ``p_value``: 2 min(#{d* <= 0}, #{d* >= 0}) / R, dual to the interval; ``se``: sd of the draws.
    """
    _check_level(level)
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples}: use at least 100 (default 2000) for a percentile interval")
    if design not in ("auto", "nested", "crossed"):
        raise ValueError(f"design must be 'auto', 'nested' or 'crossed', got {design!r}")
    is_metric = isinstance(metric, Metric)
    columns = metric.columns if is_metric else [c for c in predictions.columns
                                                 if c not in (method_column, seed_column, slide_column)]
    targets = metric.targets if is_metric else ()
    seeds, frames = _per_seed_frames(predictions, method_a, method_b, columns, targets, method_column,
                                     seed_column, slide_column)
    fa, fb = frames[method_a], frames[method_b]
    n_slides = [len(f) for f in fa]
    same_slides = all(list(f[slide_column]) == list(fa[0][slide_column]) for f in fa)
    if design == "auto":
        design = "crossed" if same_slides else "nested"
    if design == "crossed" and not same_slides:
        raise ValueError("design='crossed' needs the same test slides in every seed; use 'nested' or 'auto'")
    observed_a = np.array([_observed(metric, f, method_a, s) for f, s in zip(fa, seeds)])
    observed_b = np.array([_observed(metric, f, method_b, s) for f, s in zip(fb, seeds)])

    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    seed_draws = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_resamples)  # [R, S]
    if is_metric:
        prepared = [{id(f): metric.prepare(f) for f in frames[m]} for m in (method_a, method_b)]

        def evaluate(frame: pd.DataFrame, k: int, counts: np.ndarray) -> np.ndarray:
            return _resampled_from_arrays(metric.kind, prepared[k][id(frame)], counts)
    else:
        def evaluate(frame: pd.DataFrame, k: int, counts: np.ndarray) -> np.ndarray:
            return _generic_resampled(metric, frame, counts)
    diff_sum = np.zeros(n_resamples)
    if design == "crossed":
        counts = rng.multinomial(n_slides[0], np.full(n_slides[0], 1 / n_slides[0]), size=n_resamples)
        for j in range(n_seeds):
            d = evaluate(fa[j], 0, counts) - evaluate(fb[j], 1, counts)
            diff_sum += np.where(seed_draws[:, j] > 0, seed_draws[:, j] * d, 0.0)  # NaN only where drawn
    else:
        for j in range(n_seeds):
            replicate = np.repeat(np.arange(n_resamples), seed_draws[:, j])  # one row per drawn copy of seed j
            if replicate.size == 0:
                continue
            n = n_slides[j]
            counts = rng.multinomial(n, np.full(n, 1 / n), size=replicate.size)
            d = evaluate(fa[j], 0, counts) - evaluate(fb[j], 1, counts)
            np.add.at(diff_sum, replicate, d)  # NaN propagates into its replicate
    draws = diff_sum / n_seeds
    valid = np.isfinite(draws)
    if valid.sum() < 100:
        raise ValueError(f"{method_a!r} vs {method_b!r}: the metric is undefined on {int((~valid).sum())} of "
                         f"{n_resamples} resamples (too few slides of a class?); cannot form an interval")
    draws = draws[valid]
    low, high = _percentile_interval(draws, level)
    name = metric.name if is_metric else getattr(metric, "__name__", "metric")
    return PairedDifference(
        method_a, method_b, name, tuple(seeds), observed_a, observed_b, low, high, level,
        float(draws.std(ddof=1)), _bootstrap_p(draws),
        f"hierarchical bootstrap ({design}: seeds, then slides; {draws.size} resamples)",
        int(min(n_slides)), draws, int((~valid).sum()))


def _observed(metric: Callable, frame: pd.DataFrame, method: str, seed: Any) -> float:
    try:
        value = float(metric(frame))
    except ValueError as err:
        raise ValueError(f"metric undefined for {method!r}, seed {seed!r} on its {len(frame)} test slides: {err}") \
            from None
    if not np.isfinite(value):
        raise ValueError(f"metric is NaN for {method!r}, seed {seed!r} on its {len(frame)} test slides")
    return value


def _generic_resampled(metric: Callable, frame: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    out = np.empty(len(counts))
    for r, c in enumerate(counts):
        try:
            out[r] = float(metric(frame.iloc[np.repeat(np.arange(len(frame)), c)]))
        except ValueError:
            out[r] = np.nan
    return out


def paired_t(values_a: Any, values_b: Any, level: float = 0.95, method_a: str = "a", method_b: str = "b",
             metric: str = "metric", seeds: Sequence | None = None) -> PairedDifference:
    """Paired t on matched per-seed metrics ``values_a[i]``, ``values_b[i]`` (same seed i): interval
    ``d̄ ± t_{n-1} sd(d) / sqrt(n)`` and the two-sided p of ``scipy.stats.ttest_rel``. For results without
    per-slide predictions: the interval then holds seed variance only (test-slide noise enters through it only
    if the test set differs between seeds). When all differences are equal (sd 0) the interval is that point and
    p is 0 (1 if the differences are 0)."""
    a = _finite_vector(values_a, "values_a", 2)
    b = _finite_vector(values_b, "values_b", 2)
    if a.shape != b.shape:
        raise ValueError(f"values_a has {a.size} seeds but values_b has {b.size}; pass matched seeds")
    _check_level(level)
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    if se == 0.0:
        low = high = float(d.mean())
        p = 1.0 if d.mean() == 0 else 0.0
    else:
        result = st.ttest_rel(a, b)
        low, high = result.confidence_interval(level)
        p = float(result.pvalue)
    return PairedDifference(method_a, method_b, metric, tuple(seeds if seeds is not None else range(d.size)), a, b,
                            float(low), float(high), level, se, p, f"paired t over {d.size} seeds")


def paired_seed_difference(per_seed: pd.DataFrame, method_a: str, method_b: str, column: str,
                           level: float = 0.95, method_column: str = "method", seed_column: str = "seed",
                           ) -> PairedDifference:
    """:func:`paired_t` from a table with one row per (method, seed) and the metric in ``column``."""
    for c in (method_column, seed_column, column):
        if c not in per_seed:
            raise ValueError(f"per_seed lacks column {c!r}; it has {list(per_seed.columns)}")
    tables = {}
    for m, arg in ((method_a, "method_a"), (method_b, "method_b")):
        part = per_seed[per_seed[method_column] == m]
        if part.empty:
            raise ValueError(f"{arg}={m!r} has no rows in per_seed[{method_column!r}]; methods there: "
                             f"{sorted(map(str, per_seed[method_column].unique()))}")
        if part[seed_column].duplicated().any():
            raise ValueError(f"per_seed has several rows for {m!r} and one seed (column {seed_column!r})")
        tables[m] = part.set_index(seed_column)[column]
    sa, sb = set(tables[method_a].index), set(tables[method_b].index)
    if sa != sb:
        raise ValueError(f"seeds are not matched between methods: only {method_a!r} has {sorted(sa - sb)}, "
                         f"only {method_b!r} has {sorted(sb - sa)} (column {seed_column!r})")
    seeds = sorted(sa)
    a, b = tables[method_a].loc[seeds].to_numpy(float), tables[method_b].loc[seeds].to_numpy(float)
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError(f"per_seed[{column!r}] has NaN for {method_a!r} or {method_b!r}; drop undefined runs "
                         "explicitly and say so")
    return paired_t(a, b, level, method_a, method_b, column, seeds)


# -------------------------------------------------------------------------------------------- tests
def sign_flip_test(differences: Any, alternative: Literal["two-sided", "greater", "less"] = "two-sided",
                   seed: int = 0) -> float:
    """Exact sign-flip (randomisation) test of "median-symmetric around 0" for matched per-seed differences
    ``[n]`` (Fisher 1935; ``scipy.stats.permutation_test`` with ``permutation_type="samples"``, statistic: mean).

    Exact (all 2^n sign vectors) for n <= 16, else 100 000 random sign vectors (seeded). Refuses n < 6 with a
    ``ValueError``: with 5 seeds the smallest two-sided p is 2 / 2^5 = 1/16 > 0.05, so the test could never
    reject and a reported p would only look like evidence.
    """
    d = _finite_vector(differences, "differences")
    if d.size < MIN_SEEDS_SIGN_FLIP:
        raise ValueError(f"sign-flip test needs >= {MIN_SEEDS_SIGN_FLIP} seeds, got {d.size}: with n seeds the "
                         f"smallest two-sided p is 2/2^n (1/16 for 5), which cannot reach 0.05")
    exact = d.size <= _EXACT_SIGN_FLIP_MAX
    result = st.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                 vectorized=True, n_resamples=np.inf if exact else 100_000,
                                 alternative=alternative, random_state=seed)
    return float(result.pvalue)


def holm(p_values: Any) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values across the rows of one table: with the m defined p sorted
    ascending, ``p~_(k) = max_{j <= k} min(1, (m - j + 1) p_(j))`` (monotone in p). Rejecting where
    ``p~ < alpha`` controls the family-wise error rate at alpha. NaN entries stay NaN and do not count in m."""
    p = to_numpy(p_values).reshape(-1)
    out = np.full(p.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    if ((p[defined] < 0) | (p[defined] > 1)).any():
        raise ValueError(f"p_values must lie in [0, 1], got {p[defined].min():.3g} .. {p[defined].max():.3g}")
    m = defined.size
    order = defined[np.argsort(p[defined], kind="stable")]
    out[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    return out


def minimum_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8, df: int | None = None) -> float:
    """Smallest true difference a two-sided test at ``alpha`` detects with probability ``power``:
    ``MDE = (z_{1-alpha/2} + z_{power}) · SE`` (Bloom 1995), ~2.80 SE for 80 % power at 0.05; with ``df`` the
    Student-t quantiles (a paired t over df + 1 seeds; e.g. 3.72 SE for 5 seeds). In the metric's units."""
    if not (np.isfinite(se) and se >= 0):
        raise ValueError(f"se must be a finite, non-negative standard error, got {se}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha}, power={power}")
    if df is None:
        factor = st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)
    else:
        if df < 1:
            raise ValueError(f"df must be >= 1 (seeds - 1), got {df}")
        factor = st.t.ppf(1 - alpha / 2, df) + st.t.ppf(power, df)
    return float(factor * se)
