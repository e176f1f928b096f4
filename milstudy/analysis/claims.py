"""Claims with intervals: a paper's statement, our measured difference with its interval, and a verdict that
follows from the interval (DESIGN.md "Claim"; project issue "Claims with intervals").

- ``Claim``: the statement, the two methods compared (A vs B), the metric, the paper's direction ("greater": the
  paper says metric(A) > metric(B); "less": metric(A) < metric(B), e.g. sparsity or risk) and its numbers.
- ``claims_table(claims, predictions=..., per_seed=...)``: one row per claim (columns in :data:`COLUMNS`).
- ``verdict_sentence(row)``: the prose of a row, so notebook text is computed from the table, not typed.
- ``save_claims(table)``: ``claims.csv`` + ``claims.md`` in the notebook's results folder.

Verdict rule (one rule, for every table). Each row gets a two-sided p that is dual to its interval
(hierarchical-bootstrap percentile interval, or the paired t-interval over seeds; see
:mod:`milstudy.analysis.stats`): the interval at level 1 - γ excludes 0 exactly when p < γ. Holm's step-down
adjustment across the rows of the table gives p_holm, and each row's *verdict interval* is its interval at the
Holm-adjusted level 1 - γ_k with γ_k = α · p / p_holm (α/m for a row with p = 0), i.e. widened by as much as
Holm's multiplier for that row. Hence the verdict interval excludes 0 exactly when p_holm < α, and

- "supported": the verdict interval excludes 0 on the side the paper claims;
- "contradicted": it excludes 0 on the other side;
- "inconclusive": it contains 0 (then ``mde`` says which difference the design could have detected).

With one claim the verdict interval is the plain 1 - α interval. The exact sign-flip test over seeds is
reported beside (``p_sign_flip``, Holm-adjusted across the rows where it is defined) and is NaN with a note
below 6 seeds, where it cannot reach 0.05; it does not enter the verdict.

Example::

    from milstudy.analysis.claims import Claim, claims_table, save_claims, verdict_sentence
    claims = [Claim("ABMILX beats ABMIL", "ABMILX", "ABMIL", "auc", "greater", 93.97, 89.23, "AUC, %",
                    source="Sec. 3.3 table"),
              Claim("ABMILX has lower risk than MHLA", "ABMILX", "MHLA", "risk", "less", source="Eq. 15")]
    table = claims_table(claims, predictions=test_predictions, per_seed=per_seed_analysis)
    save_claims(table)
    print(verdict_sentence(table.iloc[0]))

``predictions``: long frame, one row per (method, seed, slide_id) with the metric's columns (``target, prob_1``
for "auc" (macro one-vs-rest over ``prob_0 .. prob_{C-1}`` when C >= 3) and "accuracy" (``prediction``),
``time, event, risk`` for "c_index"), or a mapping metric name ->
such a frame. ``per_seed``: one row per (method, seed) with per-seed scalar metrics as columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from milstudy.analysis import stats

VERDICTS = ("supported", "contradicted", "inconclusive")
COLUMNS = (
    "claim", "source", "paper", "paper_difference", "direction", "method_a", "method_b", "metric",
    "mean_a", "mean_b", "difference", "ci_low", "ci_high", "level", "interval", "p", "p_holm", "verdict_level",
    "verdict_ci_low", "verdict_ci_high", "verdict", "mde", "p_sign_flip", "p_sign_flip_holm", "n_seeds",
    "n_slides", "note",
)


@dataclass(frozen=True)
class Claim:
    """One statement of a paper, checked as the difference metric(A) - metric(B) over matched seeds.

    direction: "greater" if the paper says A is higher than B in ``metric`` (higher-is-better metrics such as
    AUC), "less" if it says A is lower (sparsity, risk). ``paper_a`` / ``paper_b``: the paper's numbers, in
    ``paper_units`` (e.g. "AUC, %"), shown beside ours; None when the paper states the claim without numbers.
    """

    statement: str
    method_a: str
    method_b: str
    metric: str
    direction: Literal["greater", "less"] = "greater"
    paper_a: float | None = None
    paper_b: float | None = None
    paper_units: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("greater", "less"):
            raise ValueError(f"Claim {self.statement!r}: direction must be 'greater' (A > B) or 'less' (A < B), "
                             f"got {self.direction!r}")
        if self.method_a == self.method_b:
            raise ValueError(f"Claim {self.statement!r}: method_a and method_b are both {self.method_a!r}")

    @property
    def paper_text(self) -> str:
        if self.paper_a is None and self.paper_b is None:
            return "claimed" + (f" ({self.source})" if self.source else "")
        units = f" ({self.paper_units})" if self.paper_units else ""
        return f"{_num(self.paper_a)} vs {_num(self.paper_b)}{units}"

    @property
    def paper_difference(self) -> float:
        if self.paper_a is None or self.paper_b is None:
            return float("nan")
        return float(self.paper_a) - float(self.paper_b)


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


DEFAULT_METRICS: dict[str, Callable[[], stats.Metric]] = {
    "auc": stats.auc_metric, "c_index": stats.c_index_metric, "accuracy": stats.accuracy_metric,
}


def default_metric(name: str, frame: pd.DataFrame) -> stats.Metric:
    """The default metric of ``name``; "auc" is the macro one-vs-rest AUC when the frame has three or more
    ``prob_k`` columns (multi-class predictions), the binary AUC of ``prob_1`` otherwise."""
    n_classes = 0
    while f"prob_{n_classes}" in frame:
        n_classes += 1
    if name == "auc" and n_classes >= 3:
        return stats.macro_auc_metric(n_classes)
    return DEFAULT_METRICS[name]()


def _resolve(claim: Claim, predictions: pd.DataFrame | Mapping[str, pd.DataFrame] | None,
             per_seed: pd.DataFrame | None, metrics: Mapping[str, Any]) -> tuple[str, Any, pd.DataFrame | None]:
    """("bootstrap", metric, frame) when per-slide predictions can score the claim, else ("t", column, per_seed)."""
    frame = predictions.get(claim.metric) if isinstance(predictions, Mapping) else predictions
    if frame is not None:
        metric = metrics.get(claim.metric)
        if metric is None and claim.metric in DEFAULT_METRICS:
            metric = default_metric(claim.metric, frame)
        if metric is not None and (not isinstance(metric, stats.Metric) or all(c in frame for c in metric.columns)):
            return "bootstrap", metric, frame
    if per_seed is not None and claim.metric in per_seed:
        return "t", claim.metric, per_seed
    raise ValueError(
        f"claim {claim.statement!r}: metric {claim.metric!r} is neither scorable from predictions (pass "
        f"metrics={{{claim.metric!r}: Metric or f(frame)}} and its columns) nor a column of per_seed "
        f"({[] if per_seed is None else list(per_seed.columns)})")


def evaluate_claim(
    claim: Claim,
    predictions: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    per_seed: pd.DataFrame | None = None,
    metrics: Mapping[str, stats.Metric | Callable[[pd.DataFrame], float]] | None = None,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    **columns: str,
) -> stats.PairedDifference:
    """The paired difference of one claim: hierarchical bootstrap from per-slide predictions when the metric can be
    scored from them, else the paired t over seeds from ``per_seed`` (see :func:`claims_table`)."""
    kind, metric, frame = _resolve(claim, predictions, per_seed, metrics or {})
    if kind == "bootstrap":
        return stats.paired_bootstrap(frame, claim.method_a, claim.method_b, metric, n_resamples, level, seed,
                                      **columns)
    seed_columns = {k: v for k, v in columns.items() if k in ("method_column", "seed_column")}
    return stats.paired_seed_difference(frame, claim.method_a, claim.method_b, metric, level, **seed_columns)


def claims_table(
    claims: Sequence[Claim],
    predictions: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    per_seed: pd.DataFrame | None = None,
    metrics: Mapping[str, stats.Metric | Callable[[pd.DataFrame], float]] | None = None,
    alpha: float = 0.05,
    n_resamples: int = 2000,
    seed: int = 0,
    holm_adjust: bool = True,
    **columns: str,
) -> pd.DataFrame:
    """One row per claim with our difference, its interval and the verdict (rule in the module docstring).

    Each claim is scored from ``predictions`` (per-slide, hierarchical bootstrap, ``n_resamples`` with RNG
    ``seed``: the same seed for every row, so a row does not depend on its position) when its metric is in
    ``metrics`` or is "auc" / "c_index" / "accuracy" with their columns present; otherwise from the ``per_seed``
    column of that name (paired t). ``columns``: ``method_column``, ``seed_column``, ``slide_column`` if the
    frames name them differently. ``holm_adjust=False`` judges every row at level 1 - alpha alone.

    Columns (:data:`COLUMNS`): claim, source, paper (text), paper_difference (paper units), direction ("A > B"),
    method_a, method_b, metric, mean_a, mean_b, difference (A - B, our units), ci_low / ci_high (at ``level``
    = 1 - alpha), interval (how), p (two-sided, dual to the interval), p_holm, verdict_level, verdict_ci_low /
    verdict_ci_high, verdict, mde (80 % power at alpha), p_sign_flip (NaN below 6 seeds), p_sign_flip_holm,
    n_seeds, n_slides (test slides per seed, min over seeds; NaN for per-seed metrics), note.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    claims = list(claims)
    if not claims:
        raise ValueError("claims is empty; pass at least one Claim")
    if not all(isinstance(c, Claim) for c in claims):
        raise TypeError("claims must be Claim objects (milstudy.analysis.claims.Claim)")
    differences = [evaluate_claim(c, predictions, per_seed, metrics, 1 - alpha, n_resamples, seed, **columns)
                   for c in claims]
    rows = []
    for claim, diff in zip(claims, differences):
        notes = []
        try:
            p_flip = stats.sign_flip_test(diff.seed_differences)
        except ValueError:
            p_flip = float("nan")
            notes.append(f"sign-flip test needs >= {stats.MIN_SEEDS_SIGN_FLIP} seeds (have {diff.n_seeds})")
        if diff.n_skipped:
            notes.append(f"{diff.n_skipped} resamples with the metric undefined were dropped")
        rows.append({
            "claim": claim.statement, "source": claim.source, "paper": claim.paper_text,
            "paper_difference": claim.paper_difference,
            "direction": f"{claim.method_a} {'>' if claim.direction == 'greater' else '<'} {claim.method_b}",
            "method_a": claim.method_a, "method_b": claim.method_b, "metric": claim.metric,
            "mean_a": diff.mean_a, "mean_b": diff.mean_b, "difference": diff.difference,
            "ci_low": diff.ci_low, "ci_high": diff.ci_high, "level": 1 - alpha, "interval": diff.interval_method,
            "p": diff.p_value,
            "mde": diff.mde(alpha), "p_sign_flip": p_flip, "n_seeds": diff.n_seeds,
            "n_slides": np.nan if diff.n_slides is None else diff.n_slides, "note": "; ".join(notes),
        })
    table = pd.DataFrame(rows)
    p = table["p"].to_numpy(float)
    table["p_holm"] = stats.holm(p) if holm_adjust else p
    table["p_sign_flip_holm"] = stats.holm(table["p_sign_flip"]) if holm_adjust else table["p_sign_flip"]
    levels, lows, highs, verdicts = [], [], [], []
    m = len(claims)
    for claim, diff, p_row, p_adj in zip(claims, differences, p, table["p_holm"]):
        gamma = alpha * p_row / p_adj if p_adj > 0 else alpha / m
        low, high = diff.interval(1 - gamma)
        levels.append(1 - gamma)
        lows.append(low)
        highs.append(high)
        verdicts.append(_verdict(low, high, claim.direction))
    table["verdict_level"], table["verdict_ci_low"], table["verdict_ci_high"] = levels, lows, highs
    table["verdict"] = verdicts
    return table[list(COLUMNS)]


def _verdict(low: float, high: float, direction: str) -> str:
    if low > 0:
        return "supported" if direction == "greater" else "contradicted"
    if high < 0:
        return "supported" if direction == "less" else "contradicted"
    return "inconclusive"


def _signed(x: float) -> str:
    return f"{x:+.3g}"


def verdict_sentence(row: Mapping[str, Any] | pd.Series) -> str:
    """One or two sentences for notebook prose from a row of :func:`claims_table`, e.g.
    "Supported: ABMILX beats ABMIL. ABMILX − ABMIL in auc = +0.042 (95 % CI +0.011 to +0.075; ...)"."""
    missing = [c for c in ("claim", "verdict", "method_a", "method_b", "metric", "difference", "ci_low", "ci_high",
                           "verdict_ci_low", "verdict_ci_high", "p_holm", "mde", "n_seeds",
                           "interval", "paper") if c not in row]
    if missing:
        raise ValueError(f"row lacks {missing}; pass a row of claims_table(...)")
    level = 100 * float(row.get("level", 0.95))
    slides = row.get("n_slides")
    design = f", {int(row['n_seeds'])} seeds × {int(slides)} test slides" if slides == slides and slides else ""
    text = (f"{row['verdict'].capitalize()}: {row['claim']}. {row['method_a']} − {row['method_b']} in "
            f"{row['metric']} = {_signed(row['difference'])} ({level:g} % CI {_signed(row['ci_low'])} to "
            f"{_signed(row['ci_high'])}; {row['interval']}{design}; Holm-adjusted p = {row['p_holm']:.3g}).")
    if row["verdict"] == "inconclusive":
        text += (f" The Holm-widened interval ({_signed(row['verdict_ci_low'])} to "
                 f"{_signed(row['verdict_ci_high'])}) contains 0; this design detects differences of about "
                 f"{row['mde']:.2g} with 80 % power.")
    elif row["verdict"] == "contradicted":
        text += " The difference goes against the paper's direction."
    return text + f" Paper: {row['paper']}."


def save_claims(table: pd.DataFrame, name: str = "claims") -> Path:
    """Write the claims table as ``<name>.csv`` (full precision) and ``<name>.md`` (3 significant digits) into
    the notebook's results folder via :func:`milstudy.runner.save_table`; returns the CSV path."""
    missing = [c for c in ("claim", "verdict", "difference", "ci_low", "ci_high") if c not in table]
    if missing:
        raise ValueError(f"table lacks {missing}; pass the output of claims_table(...)")
    from milstudy.runner import save_table

    return save_table(table, name, floatfmt=".3g")
