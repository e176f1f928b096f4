"""ASMIL's main comparison (S3, Table 1) and the anchor's significance table (Table 12) on the two shifted synthetic
worlds of :mod:`milstudy.papers.asmil_worlds` (notebook 24; specs/asmil.md §4.3 S3, S4): CAMELYON-17-like (test
slides from unseen centres) and BRACS-like (benign / atypical / malignant). Notebook 20 is the CAMELYON-16-like
column (its world, its runs).

- :func:`world_bags`: the bags of one named world.
- :func:`run_worlds`: :func:`milstudy.papers.asmil.run_dynamics` per world (same variants, seeds and config).
- :func:`main_table`: mean ± sd over seeds (ddof = 1) of test macro-AUC, macro-F1 and accuracy (= micro-F1, the
  paper's third column) per world and method, with the validation AUC beside them (in-distribution on the
  CAMELYON-17-like world: the shift shows as the gap).
- :func:`main_claims`: the paper's claims per world, one claims table with Holm across every row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from milstudy.analysis.claims import Claim, claims_table
from milstudy.papers import asmil, asmil_worlds

WORLDS = {"CAMELYON-17-like": asmil_worlds.centre_shifted_bags, "BRACS-like": asmil_worlds.bracs_like_bags}
# The paper's Table 12 (10 seeds, ViT-S features), F1 and AUC per dataset as (with, without) the anchor, i.e.
# (paper_a, paper_b) of the claim "ASMIL (with) beats ASMIL without anchor".
TABLE_12 = {"CAMELYON-17-like": {"f1_macro": (0.693, 0.642), "auc": (0.899, 0.879)},
            "BRACS-like": {"f1_macro": (0.784, 0.729), "auc": (0.916, 0.866)}}
SMALL_LAMBDA = "ASMIL (λ = 0.003)"  # notebook 23's ablation weight, where ASMIL with an anchor still learns
SPECS = {SMALL_LAMBDA: ("asmil", {"anchor_lambda": 0.003})}


def world_bags(name: str, profile: str = "cpu", seed: int = 1, label_noise: float = 0.2,
               n_slides: int | Mapping[str, int] | None = None, **kwargs: Any) -> asmil.AsmilData:
    """The bags of world ``name`` (a key of :data:`WORLDS`); ``n_slides``: one count, or one per world name (a
    world not named keeps its default); ``kwargs`` go to its builder."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose from {list(WORLDS)}")
    if isinstance(n_slides, Mapping):
        n_slides = n_slides.get(name)
    return WORLDS[name](profile, seed=seed, label_noise=label_noise, n_slides=n_slides, **kwargs)


def run_worlds(worlds: Mapping[str, asmil.AsmilData], variants: Sequence[str], seeds: Sequence[int], config: Any,
               world_overrides: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
               **kwargs: Any) -> dict[str, asmil.Dynamics]:
    """Every variant x seed on every world (``kwargs`` to :func:`milstudy.papers.asmil.run_dynamics`; the
    variants of :data:`SPECS` are known to it). ``world_overrides[world][variant]``: model kwargs for that world
    only (e.g. the spec's K = 16 FEAT tokens on CAMELYON-17), on top of ``kwargs["overrides"]``."""
    specs = {**SPECS, **kwargs.pop("specs", {})}
    shared = dict(kwargs.pop("overrides", None) or {})
    out = {}
    for name, data in worlds.items():
        extra = (world_overrides or {}).get(name, {})
        overrides = {v: {**shared.get(v, {}), **extra.get(v, {})} for v in set(shared) | set(extra)}
        out[name] = asmil.run_dynamics(data, variants, seeds, config, specs=specs, overrides=overrides, **kwargs)
    return out


def main_table(results: Mapping[str, asmil.Dynamics]) -> pd.DataFrame:
    """One row per (world, method): mean ± sd over seeds (ddof = 1; :func:`milstudy.papers.grids.mean_std`) of
    test AUC (macro one-vs-rest with 3 classes), macro-F1, accuracy and validation AUC, and ``n`` (runs)."""
    from milstudy.papers.grids import mean_std

    runs = pd.concat([r.runs.assign(world=w) for w, r in results.items()], ignore_index=True)
    return mean_std(runs, ["world", "method"], ["test_auc", "test_f1_macro", "test_accuracy", "val_auc"])


# (statement, A, B, metric, direction, source); the paper's numbers come from TABLE_12 where it has them, and
# the source text from SOURCES per world where the paper gives that cohort's number.
MAIN_CLAIMS = [
    ("The anchor raises ASMIL's macro-F1", "ASMIL", "ASMIL without anchor", "f1_macro", "greater", "Table 12"),
    ("The anchor raises ASMIL's AUC", "ASMIL", "ASMIL without anchor", "auc", "greater", "Table 12"),
    ("A small anchor (λ = 0.003) raises ASMIL's macro-F1", SMALL_LAMBDA, "ASMIL without anchor", "f1_macro",
     "greater", "Table 12 at notebook 23's λ"),
    ("A small anchor (λ = 0.003) raises ASMIL's AUC", SMALL_LAMBDA, "ASMIL without anchor", "auc", "greater",
     "Table 12 at notebook 23's λ"),
    ("ASMIL beats ABMIL (macro-F1)", "ASMIL", "ABMIL", "f1_macro", "greater", "Table 1 (against the best baseline)"),
    ("ASMIL beats ABMIL (AUC)", "ASMIL", "ABMIL", "auc", "greater", "Table 1 (against the best baseline)"),
    ("The anchor + NSF raises ABMIL's macro-F1 (plug-in)", "ABMIL + anchor + NSF", "ABMIL", "f1_macro", "greater",
     "Table 2"),
    ("The anchor + NSF raises ABMIL's AUC (plug-in)", "ABMIL + anchor + NSF", "ABMIL", "auc", "greater", "Table 2"),
    ("The anchor + NSF raises DSMIL's macro-F1 (plug-in)", "DSMIL + anchor + NSF", "DSMIL", "f1_macro", "greater",
     "Table 2"),
]
SOURCES = {  # (world, statement) -> source text with the paper's number for that cohort
    ("CAMELYON-17-like", "ASMIL beats ABMIL (macro-F1)"): "Table 1 (+6.49 % F1 over the best baseline on CAMELYON-17)",
    ("BRACS-like", "ASMIL beats ABMIL (macro-F1)"): "Table 1 (+3.9 F1 points over the best baseline on BRACS)",
    ("BRACS-like", "ASMIL beats ABMIL (AUC)"): "Table 1 (+0.9 AUC points over the best baseline on BRACS)",
    ("BRACS-like", "The anchor + NSF raises ABMIL's macro-F1 (plug-in)"): "Table 2 (+10.73 % F1 for ABMIL on BRACS)",
}


def _label(world: str, method: str) -> str:
    return f"{world}: {method}"


def main_claims(results: Mapping[str, asmil.Dynamics], n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The rows of :data:`MAIN_CLAIMS` per world whose methods ran (``world`` column; methods named
    ``"<world>: <method>"``): AUC from per-slide test predictions by hierarchical bootstrap (seeds, then slides;
    macro one-vs-rest on a 3-class world), macro-F1 by the paired t over seeds; Holm across every row."""
    from milstudy.analysis.claims import default_metric

    claims, predictions, metrics, per_seed = [], {}, {}, []
    for world, result in results.items():
        ran = set(result.runs["method"])
        auc = f"auc ({world})"  # one metric name per world: binary AUC here, macro one-vs-rest on 3 classes
        predictions[auc] = result.predictions.assign(method=lambda f: _label(world, "") + f["method"])
        metrics[auc] = default_metric("auc", result.predictions)
        per_seed.append(result.runs.rename(columns={"test_f1_macro": "f1_macro"}).assign(
            method=lambda f: _label(world, "") + f["method"]))
        for statement, a, b, metric, direction, source in MAIN_CLAIMS:
            if a not in ran or b not in ran:
                continue
            paper = TABLE_12.get(world, {}).get(metric) if b == "ASMIL without anchor" and a == "ASMIL" else None
            claims.append(Claim(f"{world}: {statement}", _label(world, a), _label(world, b),
                                auc if metric == "auc" else metric, direction, *(paper or (None, None)),
                                f"{metric} ({world.split('-like')[0]})" if paper else "",
                                source=SOURCES.get((world, statement), source)))
    if not claims:
        raise ValueError("main_claims: none of the claims' method pairs were run")
    table = claims_table(claims, predictions=predictions, per_seed=pd.concat(per_seed, ignore_index=True),
                         metrics=metrics, n_resamples=n_resamples, seed=seed)
    table.insert(0, "world", [c.statement.split(":")[0] for c in claims])
    return table
