"""Attention analyses logged over training (ABMILX spec §4.3 E1 "attention distributions over training" and E6
"risk over epochs"): a per-epoch callback for ``milstudy.train.e2e.train_e2e`` and the function it calls.

``attention_records`` runs an aggregator once on each tracked bag (all instances, eval mode, no grad) and returns
tidy rows: sparsity measures (``sparsity.py``), optimisation risk (``risk.py``, positive slides), the modulation
factor Λ (``modulation.py``, models exposing ``extras["local_logits"]`` / ``extras["attn_plus_delta"]``) and
localization (``localization.py``), plus the raw attention ``[heads, N]`` per slide as the epoch's snapshot.
``AttentionTracker`` calls it after every epoch of an E2E run, encoding the tracked slides' patches with the
current encoder; ``track_two_stage`` does the same for an aggregator on fixed feature bags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax

from milstudy.analysis.localization import instance_auroc, top_k_precision
from milstudy.analysis.modulation import modulation_factor, model_alpha
from milstudy.analysis.risk import optimization_risk
from milstudy.analysis.sparsity import sparsity_summary


@dataclass
class EpochRecords:
    """Tidy tables of one or more epochs: ``slides`` (sparsity, risk, localization per slide), ``modulation``
    (Λ per slide and head) and ``attention`` snapshots ``{epoch: {slide_id: [heads, N]}}``."""

    slides: pd.DataFrame = field(default_factory=pd.DataFrame)
    modulation: pd.DataFrame = field(default_factory=pd.DataFrame)
    attention: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def extend(self, other: "EpochRecords") -> None:
        self.slides = pd.concat([self.slides, other.slides], ignore_index=True)
        self.modulation = pd.concat([self.modulation, other.modulation], ignore_index=True)
        for epoch, snap in other.attention.items():
            self.attention.setdefault(epoch, {}).update(snap)


@torch.no_grad()
def attention_records(
    aggregator: torch.nn.Module,
    features: Sequence[torch.Tensor],
    instance_labels: Sequence[Any | None],
    slide_ids: Sequence[str],
    epoch: int,
    alpha: float | None = None,
) -> EpochRecords:
    """Analyse one epoch. features[i]: ``[N_i, D]`` on the aggregator's device; instance_labels[i]: ``[N_i]`` 0/1
    or None; alpha: α for Λ's sign split (default: read from the aggregator). Rows carry ``epoch`` and ``slide_id``."""
    was_training = aggregator.training
    aggregator.eval()
    alpha = model_alpha(aggregator) if alpha is None else alpha
    rows, lambdas, snapshot = [], [], {}
    try:
        for feats, labels, slide_id in zip(features, instance_labels, slide_ids):
            out = aggregator(feats[None])
            if out.attention is None:
                raise ValueError(f"{type(aggregator).__name__} returns no attention; it cannot be tracked")
            attention = out.attention[0].double().cpu().numpy()
            attention = attention / attention.sum(axis=-1, keepdims=True)  # float32 rounding -> exact distribution
            snapshot[slide_id] = attention.astype(np.float32)
            row: dict[str, Any] = {"epoch": int(epoch), "slide_id": slide_id, **sparsity_summary(attention)}
            y = None if labels is None else np.asarray(labels).reshape(-1)
            positive = y is not None and 0 < y.sum() < y.shape[0]
            row["positive"] = bool(y is not None and y.sum() > 0)
            if positive:
                row.update({k: v for k, v in optimization_risk(attention, y).items() if k != "n_instances"})
                row["instance_auroc"] = instance_auroc(attention, y)
                row["top_k_precision"] = top_k_precision(attention, y)
                if "local_logits" in out.extras and "attn_plus_delta" in out.extras:
                    a = out.extras["local_logits"][0].double().cpu().numpy()
                    d = out.extras["attn_plus_delta"][0].double().cpu().numpy()
                    if not np.allclose(softmax(a + d, axis=-1), attention, atol=1e-4):
                        d = d - a  # the model stored the refined logits a + Δ
                if "local_logits" in out.extras and "attn_plus_delta" in out.extras and np.any(d != 0):
                    # (A+ switched off, e.g. MHLA, stores Δ = 0: Λ = 1 says nothing, so no rows)
                    frame = modulation_factor(a, d, y)
                    frame.insert(0, "slide_id", slide_id)
                    frame.insert(0, "epoch", int(epoch))
                    frame["alpha"] = alpha
                    lambdas.append(frame)
                    row["lambda_le_1_share"] = float(frame["lambda_le_1"].mean())
            rows.append(row)
    finally:
        aggregator.train(was_training)
    return EpochRecords(pd.DataFrame(rows), pd.concat(lambdas, ignore_index=True) if lambdas else pd.DataFrame(),
                        {int(epoch): snapshot})


class AttentionTracker:
    """Per-epoch callback for ``train_e2e(..., callbacks=[tracker])``: encodes every main-scale patch of the tracked
    slides (``E2ESlide`` with ``instance_labels``) with the current encoder and records :func:`attention_records`.

    Also usable on a trained model: ``tracker.record(epoch, model)`` with an ``E2EModel``. Results accumulate in
    ``tracker.records``; ``tag`` (e.g. the run name and seed) is added as columns to every row.
    """

    def __init__(self, slides: Sequence[Any], chunk: int = 1024, **tag: Any) -> None:
        if not slides:
            raise ValueError("AttentionTracker needs at least one slide to track")
        self.slides = list(slides)
        self.chunk = chunk
        self.tag = tag
        self.records = EpochRecords()

    def __call__(self, state: Any) -> None:
        self.record(state.epoch, state.model)

    @torch.no_grad()
    def record(self, epoch: int, model: torch.nn.Module) -> None:
        from milstudy.train.e2e import encode_chunked

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            features = [encode_chunked(model.encoder, s.read("main", np.arange(s.n_main)), self.chunk, device)
                        for s in self.slides]
        finally:
            model.train(was_training)
        records = attention_records(model.aggregator, features, [s.instance_labels for s in self.slides],
                                    [s.slide_id for s in self.slides], epoch)
        for frame in (records.slides, records.modulation):
            for key, value in self.tag.items():
                if not frame.empty:
                    frame[key] = value
        self.records.extend(records)


def track_two_stage(
    aggregator: torch.nn.Module, bags: Sequence[Any], epoch: int, **tag: Any
) -> EpochRecords:
    """:func:`attention_records` on fixed feature bags (``milstudy.data.bags.Bag``: features ``[N, D]``,
    ``instance_labels``, ``slide_id``), for two-stage runs; ``tag`` values become columns."""
    param = next(aggregator.parameters())
    features = [torch.as_tensor(np.asarray(b.features), dtype=param.dtype, device=param.device) for b in bags]
    records = attention_records(aggregator, features, [b.instance_labels for b in bags], [b.slide_id for b in bags],
                                epoch)
    for frame in (records.slides, records.modulation):
        for key, value in tag.items():
            if not frame.empty:
                frame[key] = value
    return records
