"""DSMIL: dual-stream MIL with a max-instance critical instance (Li, Li & Eliceiri 2021, CVPR, Eqs. 1-6).

    c_k = W_0 x_k                                                 [B,N,C]   instance classifier (Eq. 1)
    m   = argmax_k c_k  per class ("critical instance")          [B,C]
    c_m = max_k c_k                                               [B,C]     max-instance stream (Eq. 1)
    q_k = tanh(W_q2 ReLU(W_q1 x_k))                               [B,N,128] query network (Eq. 3)
    s_{c,k} = <q_k, q_m_c> / √128                                 [B,C,N]   attention logits
    U_{c,k} = softmax_k(s_{c,k})                                  [B,C,N]   distance-based attention (Eq. 4)
    b_c = Σ_k U_{c,k} x_k                                         [B,C,D]   (value = identity, upstream default)
    c_b = Conv1d(C, C, kernel=D)(b)                               [B,C]     bag stream (Eq. 5)

Loss, as the authors' train script (``loss = 0.5 * bag_loss + 0.5 * max_loss``): half the task loss on each
stream, expressed through the generic ``MILOutput`` fields and ``milstudy.models.combined_loss``:

- ``predict="bag"`` (default, the upstream test-time prediction): ``logits = c_b``, ``logits_weight = 0.5``,
  ``loss_streams = {"max_instance": (c_m, 0.5)}``.
- ``predict="mean"``: ``logits = (c_b + c_m) / 2`` (the paper's Eq. 6 combination of the two streams' scores; the
  upstream ``--average`` option averages the sigmoids instead), ``logits_weight = 0``,
  ``loss_streams = {"bag": (c_b, 0.5), "max_instance": (c_m, 0.5)}``: the training loss is the same as under
  ``"bag"``, only the prediction changes.

Upstream's task loss is a per-class BCE; here each stream gets the trainer's task loss (CE for classification).
extras: ``bag_logits`` c_b, ``max_instance_logits`` c_m, ``instance_logits`` ``[B,N,C]``, ``critical_index``
``[B,C]``. attention ``[B,C,N]`` and ``attention_logits`` s ``[B,C,N]``: one distribution per class (the class
axis is the heads axis), logits ``PAD_LOGIT`` on padding.
"""

from __future__ import annotations

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input, masked_softmax, pad_attention_logits

PREDICTIONS = ("bag", "mean")


class DSMIL(MILModel):
    """DSMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` (see the module docstring)."""

    def __init__(self, in_dim: int, n_out: int, query_dim: int = 128, predict: str = "bag") -> None:
        super().__init__()
        if predict not in PREDICTIONS:
            raise ValueError(f"DSMIL: predict must be one of {PREDICTIONS}, got {predict!r}")
        self.in_dim, self.query_dim, self.predict = in_dim, query_dim, predict
        self.instance_classifier = nn.Linear(in_dim, n_out)
        self.query = nn.Sequential(
            nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.bag_classifier = nn.Conv1d(n_out, n_out, kernel_size=in_dim)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D]`` -> MILOutput (coords unused)."""
        mask = check_bag_input(x, self.in_dim, mask, "DSMIL")
        instance_logits = self.instance_classifier(x)  # [B,N,C]
        masked = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = masked.max(dim=1)  # [B,C], [B,C]
        queries = self.query(x)  # [B,N,Q]
        critical_queries = torch.gather(queries, 1, critical.unsqueeze(-1).expand(-1, -1, self.query_dim))  # [B,C,Q]
        # [B,C,N] as (queries @ critical_queriesᵀ)ᵀ: the gradient reaching the query MLP is then contiguous [B,N,Q]
        # (an einsum over "bnq" hands back a transposed one, which makes its tanh/ReLU backward several times slower)
        scores = torch.bmm(queries, critical_queries.transpose(1, 2)).transpose(1, 2) / self.query_dim**0.5
        scores = pad_attention_logits(scores, mask)
        weights = masked_softmax(scores, mask)  # [B,C,N]
        bag_features = torch.einsum("bcn,bnd->bcd", weights, x)  # [B,C,D]
        bag_logits = self.bag_classifier(bag_features).squeeze(-1)  # [B,C]
        extras = {
            "bag_logits": bag_logits,
            "max_instance_logits": max_logits,
            "instance_logits": instance_logits,
            "critical_index": critical,
        }
        if self.predict == "bag":
            return MILOutput(
                bag_logits, weights, attention_logits=scores, extras=extras,
                logits_weight=0.5, loss_streams={"max_instance": (max_logits, 0.5)},
            )
        return MILOutput(
            0.5 * (bag_logits + max_logits), weights, attention_logits=scores, extras=extras,
            logits_weight=0.0, loss_streams={"bag": (bag_logits, 0.5), "max_instance": (max_logits, 0.5)},
        )


@register_model("dsmil")
def build_dsmil(in_dim: int, n_out: int, **kwargs) -> DSMIL:
    """DSMIL with the upstream defaults (query width 128, identity value, Conv1d bag classifier, bag prediction)."""
    return DSMIL(in_dim, n_out, **kwargs)
