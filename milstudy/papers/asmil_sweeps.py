"""ASMIL's anchor weight, its ablation and its overfitting curves (specs/asmil.md §4.3 S8, S5, S9; notebook 23),
on the S1 world of notebook 20 (:func:`milstudy.papers.asmil.asmil_bags`) and with its runner
(:func:`milstudy.papers.asmil.run_dynamics`).

- **S8, the anchor weight λ** (Figs. 9-11: "λ plateaus beyond a small value"): ASMIL at λ = 0 (the bare network:
  λ = 0 trains bit-identically to it, spec §6.8) and at every λ of the sweep, NSF target, β = 0.999 per step;
  and the token sweeps (Table 10: "the drop rate peaks within 0.4-0.7"): the number of FEAT tokens K and the drop
  rate, one at a time, at the ablation's anchor weight (:func:`token_specs`, :func:`token_table`).
- **S5, the ablation** (Tables 3, 12): anchor / NSF target / token random dropping (rd) switched off one at a
  time at one anchor weight (``ablation_lambda``): ✓✓✓, ✓✗✓ (softmax anchor target), ✓✓✗ (no rd), ✗✗✓ (no
  anchor), ✗✗✗ (neither).
- **S9, overfitting** (Fig. 12: ABMIL and ASMIL without rd rise, peak and decline; with rd the curve stays flat):
  the validation AUC of every epoch (the runs' history; the test split is scored once, at the selected epoch),
  summarised per run as the fall from its peak to the last epoch.

Variant names say what changed: "ASMIL" is λ = 1 (the paper's), "ASMIL (λ = 0.01)", "ASMIL without anchor",
", softmax anchor target", ", no token drop" (:func:`asmil_name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis.claims import Claim, claims_table

BASELINE = "ABMIL"  # S9's reference curve


def asmil_name(lam: float, target: str = "nsf", token_drop: bool = True, n_tokens: int | None = None,
               drop_rate: float | None = None) -> str:
    """The variant name of ASMIL at anchor weight ``lam`` (0 = no anchor), anchor ``target``, with/without rd, and
    (S8) a number of FEAT tokens ``n_tokens`` / a drop rate ``drop_rate`` other than the profile's (None)."""
    if lam < 0:
        raise ValueError(f"asmil_name: the anchor weight must be >= 0, got {lam}")
    if target not in ("nsf", "softmax"):
        raise ValueError(f"asmil_name: target must be 'nsf' or 'softmax', got {target!r}")
    base = "ASMIL without anchor" if lam == 0 else "ASMIL" if lam == 1 else f"ASMIL (λ = {lam:g})"
    parts = [base]
    if lam > 0 and target == "softmax":
        parts.append("softmax anchor target")
    if not token_drop:
        parts.append("no token drop")
    if n_tokens is not None:
        parts.append(f"K = {n_tokens}")
    if drop_rate is not None:
        parts.append(f"rd {drop_rate:g}")
    return ", ".join(parts)


def asmil_spec(lam: float, target: str = "nsf", token_drop: bool = True, n_tokens: int | None = None,
               drop_rate: float | None = None) -> tuple[str, dict[str, Any]]:
    """(registry name, kwargs) of :func:`asmil_name`'s variant: ``asmil_net`` without anchor, else ``asmil``."""
    kwargs: dict[str, Any] = {} if token_drop else {"drop_rate": 0.0}
    if n_tokens is not None:
        kwargs["n_tokens"] = int(n_tokens)
    if drop_rate is not None:
        kwargs["drop_rate"] = float(drop_rate)
    if lam == 0:
        return "asmil_net", kwargs
    return "asmil", {**kwargs, "anchor_lambda": float(lam), **({"anchor_target": target} if target != "nsf" else {})}


# S5's (anchor, NSF target, rd) cells in the paper's order (Table 3); the NSF column is the anchor's target.
ABLATION_CELLS = ((True, True, True), (True, False, True), (True, True, False), (False, False, True),
                  (False, False, False))


def _cell_variant(cell: tuple[bool, bool, bool], lam: float) -> tuple[float, str, bool]:
    """(anchor weight, target, rd) of an (anchor, NSF target, rd) cell at anchor weight ``lam``."""
    anchor, nsf_target, token_drop = cell
    return (lam if anchor else 0.0, "nsf" if nsf_target else "softmax", token_drop)


def cell_name(cell: tuple[bool, bool, bool], lam: float) -> str:
    """The variant name of an (anchor, NSF target, rd) cell at anchor weight ``lam``."""
    return asmil_name(*_cell_variant(cell, lam))


def sweep_specs(lambdas: Sequence[float], ablation_lambda: float) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every variant of the sweep and the ablation, name -> (registry, kwargs), in run order."""
    variants = [(lam, "nsf", True) for lam in sorted(set(lambdas) | {0.0})]
    variants += [_cell_variant(cell, ablation_lambda) for cell in ABLATION_CELLS]
    return {asmil_name(*v): asmil_spec(*v) for v in variants}  # a cell that is also a sweep point keeps its place


def token_specs(n_tokens: Sequence[int], drop_rates: Sequence[float], lam: float, profile: tuple[int, float]
                ) -> dict[str, tuple[str, dict[str, Any]]]:
    """S8's token sweeps at anchor weight ``lam``: ASMIL with each number of FEAT tokens K of ``n_tokens`` (the
    profile's drop rate) and with each drop rate of ``drop_rates`` (the profile's K); name -> (registry, kwargs).
    ``profile``: the profile's (K, drop rate) (:func:`profile_tokens`), whose model is the full ablation cell
    :func:`asmil_name` ``(lam)``: a K or a rate that gives that same model (tokens dropped per step: round(rK)),
    or no kept or no dropped token, is refused."""
    k0, r0 = profile
    problems = [f"K = {k} (need >= 2, not the profile's {k0})" for k in n_tokens if k < 2 or k == k0]
    problems += [f"drop rate {r:g} (drops round({r:g} x {k0}) = {round(r * k0)} of {k0} tokens; need 1 .. {k0 - 1}, "
                 f"not the profile's {round(r0 * k0)})" for r in drop_rates
                 if not 0 < r < 1 or not 1 <= round(r * k0) < k0 or round(r * k0) == round(r0 * k0)]
    if problems:
        raise ValueError("token_specs: " + "; ".join(problems))
    variants = [{"n_tokens": int(k)} for k in n_tokens] + [{"drop_rate": float(r)} for r in drop_rates]
    return {asmil_name(lam, **v): asmil_spec(lam, **v) for v in variants}


def profile_tokens(small: bool) -> tuple[int, float]:
    """(K, drop rate) of ASMIL in a profile: the cpu profile's small ASMIL or the model's defaults (spec §2.9)."""
    import inspect

    from milstudy.models.asmil import ASMILNet
    from milstudy.papers.asmil import SMALL_ASMIL

    defaults = inspect.signature(ASMILNet).parameters
    k = SMALL_ASMIL["n_tokens"] if small else defaults["n_tokens"].default
    return int(k), float(defaults["drop_rate"].default)


def token_table(per_seed: pd.DataFrame, specs: dict[str, tuple[str, dict[str, Any]]], lam: float,
                profile: tuple[int, float]) -> pd.DataFrame:
    """S8: one row per variant of :func:`token_specs` ``specs`` that ran, plus the full cell at anchor weight
    ``lam`` (the profile's K and drop rate, ``profile``) and its no-rd cell (rate 0), with K, drop rate, tokens
    dropped per step (round(rK)) and mean ± sd over seeds (ddof=1) of test AUC, macro-F1 and late normalised
    entropy; sorted by K, then drop rate."""
    from milstudy.papers.grids import mean_std

    n_tokens, drop_rate = profile
    settings = {asmil_name(lam): (n_tokens, drop_rate), asmil_name(lam, token_drop=False): (n_tokens, 0.0)}
    settings.update({name: (kw.get("n_tokens", n_tokens), kw.get("drop_rate", drop_rate))
                     for name, (_, kw) in specs.items()})
    ran = [name for name in settings if name in set(per_seed["method"])]
    table = mean_std(per_seed[per_seed["method"].isin(ran)], "method", ["test_auc", "test_f1_macro", "late_entropy"])
    table.insert(1, "K", table["method"].map(lambda m: settings[m][0]))
    table.insert(2, "drop_rate", table["method"].map(lambda m: settings[m][1]))
    table.insert(3, "n_drop", [round(r * k) for k, r in zip(table["K"], table["drop_rate"])])
    return table.sort_values(["K", "drop_rate"]).reset_index(drop=True)


def overfitting(history: pd.DataFrame, metric: str = "val_auc") -> pd.DataFrame:
    """S9 per (method, seed): the peak of ``metric`` over epochs, its epoch, the last epoch's value and
    ``val_auc_fall`` = peak - last (0 for a curve that ends at its peak)."""
    if metric not in history:
        raise KeyError(f"overfitting: the history has no {metric!r} column; it has {sorted(history)}")
    rows = []
    for (method, seed), run in history.sort_values("epoch").groupby(["method", "seed"], sort=False):
        values = run[metric].to_numpy(float)
        peak = int(np.nanargmax(values))
        rows.append({"method": method, "seed": seed, "peak": values[peak], "peak_epoch": int(run["epoch"].iloc[peak]),
                     "last": values[-1], "val_auc_fall": values[peak] - values[-1]})
    return pd.DataFrame(rows)


def curves(history: pd.DataFrame, metric: str = "val_auc") -> pd.DataFrame:
    """Mean and sd (ddof=1) over seeds of ``metric`` per (method, epoch): the S9 bands."""
    return history.groupby(["method", "epoch"], sort=False)[metric].agg(["mean", "std", "count"]).reset_index()


def lambda_table(per_seed: pd.DataFrame, lambdas: Sequence[float]) -> pd.DataFrame:
    """S8: one row per anchor weight (0 = no anchor), mean ± sd over seeds (ddof=1) of test AUC and macro-F1,
    validation AUC, late normalised entropy and late JSD."""
    from milstudy.papers.grids import mean_std

    names = {asmil_name(lam): lam for lam in sorted(set(lambdas) | {0.0})}
    frame = per_seed[per_seed["method"].isin(names)]
    table = mean_std(frame, "method", ["test_auc", "test_f1_macro", "val_auc", "late_entropy", "late_jsd"])
    table.insert(1, "anchor_lambda", table["method"].map(names))
    return table.sort_values("anchor_lambda").reset_index(drop=True)


def ablation_table(per_seed: pd.DataFrame, ablation_lambda: float) -> pd.DataFrame:
    """S5: one row per ablation cell that ran, in the paper's order, with its ✓ / ✗ for anchor, NSF target and rd
    and mean ± sd over seeds (ddof=1) of test AUC, macro-F1 and late normalised entropy."""
    from milstudy.papers.grids import mean_std

    cells = {cell_name(cell, ablation_lambda): cell for cell in ABLATION_CELLS}
    ran = [name for name in cells if name in set(per_seed["method"])]
    table = mean_std(per_seed[per_seed["method"].isin(ran)], "method", ["test_auc", "test_f1_macro", "late_entropy"])
    for i, part in enumerate(["anchor", "NSF", "rd"]):
        table.insert(1 + i, part, table["method"].map(lambda m, i=i: "✓" if cells[m][i] else "✗"))
    return table.set_index("method").loc[ran].reset_index()


DROP_RATE_PEAK = (0.4, 0.7)  # Table 10 / S8: the drop rate peaks within this band


def sweep_claims(result: Any, lambdas: Sequence[float], ablation_lambda: float, n_resamples: int = 2000,
                 seed: int = 0, drop_rates: Sequence[float] = (), profile_rate: float = 0.5) -> pd.DataFrame:
    """The claims table of notebook 23 (rows whose methods did not run are left out): AUC rows by hierarchical
    bootstrap over seeds and test slides, ``val_auc_fall`` (S9) by the paired t over seeds; with ``drop_rates``
    (S8's sweep at the profile's K) one row per rate outside :data:`DROP_RATE_PEAK`: the profile's rate
    ``profile_rate`` (inside it) beats that rate (rates inside the band make no claim the paper states)."""
    a = ablation_lambda
    full, no_anchor = asmil_name(a), asmil_name(0)
    paper = {1.0: (0.916, 0.866, "AUC (BRACS)")}  # Table 12 at the paper's λ = 1
    rows = [Claim(f"The anchor at λ = {lam:g} raises ASMIL's AUC", asmil_name(lam), no_anchor, "auc", "greater",
                  *paper.get(lam, (None, None, "")), source="Table 12, S8 (λ)") for lam in sorted(set(lambdas) - {0.0})]
    rows += [
        Claim("Token dropping raises ASMIL's AUC (with the anchor)", full, asmil_name(a, token_drop=False), "auc",
              "greater", source="Table 3 (S5)"),
        Claim("Token dropping raises ASMIL's AUC (without the anchor)", no_anchor, asmil_name(0, token_drop=False),
              "auc", "greater", source="Table 3 (S5)"),
        Claim("The NSF anchor target beats a softmax one in ASMIL", full, asmil_name(a, "softmax"), "auc", "greater",
              source="Table 3 (S5)"),
        Claim("Anchor + NSF + token dropping beat none of them", full, asmil_name(0, token_drop=False), "auc",
              "greater", source="Table 3 (S5)"),
        Claim("Token dropping keeps ASMIL's validation AUC from falling after its peak", no_anchor,
              asmil_name(0, token_drop=False), "val_auc_fall", "less", source="Fig. 12 (S9)"),
        Claim("ASMIL overfits less than ABMIL (smaller fall of validation AUC from its peak)", full, BASELINE,
              "val_auc_fall", "less", source="Fig. 12 (S9)"),
    ]
    low, high = DROP_RATE_PEAK
    if drop_rates and not low <= profile_rate <= high:
        raise ValueError(f"sweep_claims: profile_rate {profile_rate:g} lies outside the paper's peak {DROP_RATE_PEAK}")
    rows += [Claim(f"ASMIL's drop rate {profile_rate:g} beats {r:g} (the rate peaks within {low:g}-{high:g})", full,
                   asmil_name(a, drop_rate=r), "auc", "greater", source="Figs. 9-11, Table 10 (S8)")
             for r in drop_rates if not low <= r <= high]
    ran = set(result.runs["method"])
    claims = [c for c in rows if c.method_a in ran and c.method_b in ran]
    if not claims:
        raise ValueError(f"sweep_claims: none of the claims' method pairs were run (methods: {sorted(ran)})")
    per_seed = result.per_seed().merge(overfitting(result.history)[["method", "seed", "val_auc_fall"]],
                                       on=["method", "seed"], how="left")
    return claims_table(claims, predictions=result.predictions, per_seed=per_seed, n_resamples=n_resamples,
                        seed=seed)
