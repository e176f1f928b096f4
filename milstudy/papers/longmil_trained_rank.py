"""LongMIL §4.1 with trained weights (spec ``shared/specs/longmil.md`` §4.1, "weights: random init vs a tiny LongMIL /
full-attention model trained on the synthetic spatial task"): the rank and sparsity of the attention matrices of
FSA + 2-D RoPE (full attention, the paper's FSA baseline) and of LongMIL (2-D local layers, then the global ALiBi
layer after 2 x 2 pooling), at their seeded random init and after training on the motif world of notebook 51.

- :func:`trained_rank_study`: per seed and method, one model trained on bags of 200-500 tiles (70 % train, 15 %
  validation for selection); the attention of every layer on held-out probe bags is recorded with
  :func:`milstudy.models.longmil.record_attention` (the kernels the forward pass uses) before and after training;
  one row per (method, seed, state, probe bag, layer, head) with :func:`~milstudy.analysis.attention_rank.rank_measures`.
- :func:`trained_rank_per_seed`: the seed-level means per (method, layer type, state), the input of the claims;
  :func:`trained_rank_claims`: Fig. 2's statements (trained local attention is higher-rank than trained full
  attention; training makes full attention sparse) as paired claims over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis.claims import Claim

METHODS = ("FSA + RoPE", "LongMIL")
MEASURES = ("effective_rank_frac", "rank_rel_0.01_frac", "stable_rank", "sparsity", "numerical_rank_frac")


def _probe_rows(model: Any, bags: Sequence[Any], labels: dict[str, Any]) -> list[dict]:
    import torch

    from milstudy.analysis.attention_rank import rank_measures
    from milstudy.models.longmil import record_attention

    rows = []
    model.eval()
    for bag in bags:
        x = torch.as_tensor(bag.features, dtype=torch.float32)[None].double()
        coords = torch.as_tensor(bag.coords)[None]
        with torch.no_grad(), record_attention(model.double()) as records:
            model(x, coords=coords)
        for record in records:
            for head, matrix in enumerate(record["attention"][0]):
                rows.append({**labels, "slide_id": bag.slide_id, "layer": record["layer"],
                             "layer_type": record["type"], "head": head, **rank_measures(matrix.numpy())})
    model.float()
    return rows


def _trained_rank_run(job: dict[str, Any], shared: dict[str, Any]) -> list[dict]:
    """One (method, seed): probe at init, train, probe again (a ``process_map`` job)."""
    from dataclasses import replace

    from milstudy.models import build_model
    from milstudy.train.loop import seed_everything
    from milstudy.train.tasks import ClassificationTask
    from milstudy.train.two_stage import train_two_stage

    sets, probes = shared["sets"], shared["probes"]
    seed_everything(job["seed"])
    model = build_model(job["zoo_name"], shared["in_dim"], 2, **job["kwargs"])
    labels = {"method": job["name"], "seed": job["seed"]}
    rows = _probe_rows(model, probes, {**labels, "state": "random init"})
    fit = train_two_stage(model, ClassificationTask(2), sets["train"], sets["val"], None,
                          replace(job["config"], seed=job["seed"]))
    trained = {**labels, "state": "trained", "val_auc": float(fit.val_metrics.get("auc", np.nan)),
               "best_epoch": fit.best_epoch}
    return rows + _probe_rows(model, probes, trained)


def trained_rank_study(seeds: Sequence[int], config: Any, width: int = 64, radius: float = 3.0, n_bags: int = 120,
                       lengths: tuple[int, int] = (200, 500), n_probe: int = 4, world_seed: int = 0,
                       workers: int = 1, progress: bool = True) -> pd.DataFrame:
    """The study of the module docstring: ``config`` a ``TrainConfig``; ``width`` / ``radius`` as notebook 51's
    design (``longmil_extrapolation.StudyDesign``); motif world ``MotifWorld(n_bags, length_knots = lengths,
    seed=world_seed)``, the same bags for every seed (the seeds vary the models). Returns the rows."""
    from milstudy.data.bags import BagListDataset
    from milstudy.data.synthetic.motif_bags import MotifWorld, motif_cohort
    from milstudy.papers.longmil_extrapolation import StudyDesign, study_methods
    from milstudy.parallel import process_map

    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    cohort = motif_cohort(MotifWorld(n_bags=n_bags, length_knots=((0.0, lengths[0]), (1.0, lengths[1])),
                                     seed=world_seed))
    order = np.random.default_rng(world_seed).permutation(len(cohort.bags))
    n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
    held_out = order[n_train + n_val:]
    if len(held_out) < n_probe:
        raise ValueError(f"trained_rank_study: {len(held_out)} held-out bags < n_probe={n_probe}; raise n_bags")
    shared = {"sets": {"train": BagListDataset([cohort.bags[i] for i in order[:n_train]]),
                       "val": BagListDataset([cohort.bags[i] for i in order[n_train:n_train + n_val]])},
              "probes": [cohort.bags[i] for i in held_out[:n_probe]],
              "in_dim": int(cohort.bags[0].features.shape[1])}
    methods = study_methods(StudyDesign(width=width, radius=radius), list(METHODS))
    jobs = [{"name": name, "seed": int(seed), "zoo_name": zoo, "kwargs": dict(kwargs), "config": config}
            for name, (zoo, kwargs) in methods.items() for seed in seeds]
    done = process_map(_trained_rank_run, jobs, workers, progress, "trained-rank runs", shared=shared)
    return pd.DataFrame([row for rows in done for row in rows])


def trained_rank_per_seed(table: pd.DataFrame) -> pd.DataFrame:
    """Seed-level means of :data:`MEASURES` per (model, layer type, state), averaged over probe bags, layers of
    that type and heads; ``method`` names the cell for the claims, e.g. ``"FSA + RoPE full (trained)"``."""
    cells = table.rename(columns={"method": "model"}).groupby(["model", "layer_type", "state", "seed"],
                                                               as_index=False)[list(MEASURES)].mean()
    cells.insert(0, "method", cells["model"] + " " + cells["layer_type"] + " (" + cells["state"] + ")")
    return cells


def trained_rank_claims() -> list[Claim]:
    """Fig. 2 / §3.2 with trained weights, at the seed level: trained 2-D local attention (LongMIL's local layers)
    is higher-rank than trained full attention (FSA + RoPE), by entropy effective rank per token and by the rank at
    delta = 1e-2; training makes full attention sparser than at its init (Eq. 9)."""
    local, full = "LongMIL local (trained)", "FSA + RoPE full (trained)"
    return [Claim("trained 2-D local attention is higher-rank than trained full attention (entropy effective rank / n)",
                  local, full, "effective_rank_frac", "greater", source="Fig. 2 / §3.2"),
            Claim("trained 2-D local attention is higher-rank than trained full attention (rank at delta = 1e-2, / n)",
                  local, full, "rank_rel_0.01_frac", "greater", source="Fig. 2 / §3.2"),
            Claim("training makes full attention sparse (Eq. 9 sparsity, trained vs random init)", full,
                  "FSA + RoPE full (random init)", "sparsity", "greater", source="Fig. 2 / §3.2")]
