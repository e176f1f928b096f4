"""LongMIL (Li et al., "Rethinking Transformer for Long Contextual Histopathology WSI Analysis", NeurIPS 2024;
``shared/papers/004_cf96cfc6d2df712f.txt``; spec ``shared/specs/longmil.md``): the paper's rank and scaling
experiments (§4.1 Fig. 2, §4.2 Figs. 1 and 7) as grids and claims, built from
:mod:`milstudy.analysis.attention_matrices`, :mod:`milstudy.analysis.attention_rank` and
:mod:`milstudy.bench.local_attention`.

- :data:`RANK_KINDS`, :data:`TEMPERATURES`: the attention types and logit temperatures of spec §4.1;
- :func:`rank_study`: one tidy row per (seed, attention type, temperature) on an irregular foreground with
  spatially smooth WSI-like features and random projections (a fresh foreground, features and projection per seed);
- :func:`rank_claims`, :func:`claims_per_seed`: the paper's statements as claims over seeds;
- :func:`bench_results`, :func:`remeasure_scaling`: the committed ``local-attention`` bench and a small re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from milstudy.analysis.attention_matrices import attention_matrices, spatial_features
from milstudy.analysis.attention_rank import rank_table
from milstudy.analysis.claims import Claim
from milstudy.data.synthetic.foreground import irregular_foreground

RANK_KINDS = ("full", "local_r2", "local_r3", "local_r5", "local_r10", "alibi", "alibi_m1", "band_b3", "band_b10",
              "band_b50", "nystrom_m256", "linear")
TEMPERATURES = (0.25, 1.0, 4.0)
CLAIM_TEMPERATURE = 1.0  # logit std ~ 1 at random init (spec §3.8)


def rank_study(n_tokens: int, seeds: Sequence[int], kinds: Sequence[str] = RANK_KINDS,
               temperatures: Sequence[float] = TEMPERATURES, feature_dim: int = 64, head_dim: int = 64,
               fill: float = 0.7, smoothness: float = 2.0) -> pd.DataFrame:
    """Rank measures (:func:`~milstudy.analysis.attention_rank.rank_measures`) of every kind x temperature, per
    seed: foreground ``irregular_foreground(n_tokens, fill, seed)``, features ``spatial_features(.., feature_dim,
    seed, smoothness)``, projection ``random_projection(feature_dim, head_dim, seed)``. Columns: seed, kind, family,
    temperature and the measures."""
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    tables = []
    for seed in seeds:
        records = example_matrices(n_tokens, kinds, temperatures, seed, feature_dim, head_dim, fill, smoothness)
        tables.append(rank_table(records).assign(seed=seed))
    table = pd.concat(tables, ignore_index=True)
    return table[["seed", *[c for c in table if c != "seed"]]]


def example_matrices(n_tokens: int, kinds: Sequence[str], temperatures: Sequence[float] = (1.0,), seed: int = 0,
                     feature_dim: int = 64, head_dim: int = 64, fill: float = 0.7, smoothness: float = 2.0
                     ) -> list[dict]:
    """The attention-matrix records of one seed of :func:`rank_study` (for the raster maps)."""
    positions = irregular_foreground(n_tokens, fill=fill, seed=seed)
    features = spatial_features(positions, feature_dim, seed=seed, smoothness=smoothness)
    return attention_matrices(features, positions, kinds, temperatures, head_dim=head_dim, seed=seed)


def rank_claims(kinds: Sequence[str] | None = None, local_kind: str = "local_r10") -> list[Claim]:
    """The paper's rank / sparsity statements (§3.2-3.3, Fig. 2) as comparisons at logit temperature 1; with
    ``kinds``, only the claims whose two attention types are among them (the Nyström claim uses the first
    ``nystrom_m*`` kind given, else ``nystrom_m256``)."""
    source_local = "§3.3 Eqs. 10-14, Fig. 2c-d"
    nystrom = next((k for k in kinds or () if k.startswith("nystrom_m")), "nystrom_m256")
    claims = [
        Claim(f"2-D local attention ({local_kind}) has a higher entropy effective rank than full attention",
              local_kind, "full", "effective_rank_frac", "greater", source=source_local),
        Claim(f"2-D local attention ({local_kind}) has a higher relative-threshold rank (σ > 1e-2 σ₁) than full "
              "attention", local_kind, "full", "rank_rel_0.01_frac", "greater", source=source_local),
        Claim(f"2-D local attention ({local_kind}) is sparser (Eq. 9) than full attention", local_kind, "full",
              "sparsity", "greater", source="§3.2 Eqs. 8-9, Fig. 2d"),
        Claim(f"Nyström attention (TransMIL, {nystrom}) has a lower effective rank than full attention", nystrom,
              "full", "effective_rank_frac", "less", source="§3.2 (TransMIL discussion)"),
    ]
    return [c for c in claims if kinds is None or (c.method_a in kinds and c.method_b in kinds)]


def claims_per_seed(table: pd.DataFrame, temperature: float = CLAIM_TEMPERATURE) -> pd.DataFrame:
    """``per_seed`` frame for :func:`milstudy.analysis.claims.claims_table`: one row per (kind, seed) at
    ``temperature``, the kind in column ``method``."""
    rows = table[table["temperature"] == temperature]
    if rows.empty:
        raise ValueError(f"no rows at temperature {temperature}; the table has {sorted(table['temperature'].unique())}")
    return rows.rename(columns={"kind": "method"}).drop(columns=["family", "temperature"])


def _bench_file(name: str, suffix: str) -> Path | None:
    from milstudy import paths

    for root in (paths.results_root(), paths.REPO_ROOT / "results"):
        path = Path(root) / "benchmarks" / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def bench_results(name: str = "local_attention") -> pd.DataFrame | None:
    """The committed ``milstudy bench local-attention`` table (``results/benchmarks/<name>.csv`` under the results
    root, else the repository's), or None when it has not been run."""
    path = _bench_file(name, ".csv")
    return None if path is None else pd.read_csv(path)


def bench_goals(name: str = "local_attention") -> pd.DataFrame | None:
    """The goals table (pass / FAIL) recorded in the bench's ``<name>.json`` beside :func:`bench_results`'s CSV."""
    import json

    path = _bench_file(name, ".json")
    goals = None if path is None else json.loads(path.read_text()).get("goals")
    return pd.DataFrame(goals) if goals else None


def remeasure_scaling(sizes: Sequence[int], impls: Sequence[str] = ("local_tiled", "sdpa_masked", "sdpa_fused")
                      ) -> pd.DataFrame:
    """A small re-run of the bench (each point in a fresh subprocess, as the suite): rows as the bench's table."""
    from milstudy.bench import local_attention as bench

    unknown = sorted(set(impls) - set(bench.IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"impls {unknown} unknown; choose from {bench.IMPLEMENTATIONS}")
    frame = bench.measure_grid({impl: tuple(sizes) for impl in impls})
    return bench.add_rates(frame, bench.dense_matmul_rate())
