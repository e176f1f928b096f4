"""DSMIL: dual-stream MIL with a max-instance critical instance (Li, Li & Eliceiri 2021, CVPR, Eqs. 1-6).

    c_k = W_0 x_k                                                 [B,N,C]   instance classifier (Eq. 1)
    m   = argmax_k c_k  per class ("critical instance")          [B,C]
    q_k = tanh(W_q2 ReLU(W_q1 x_k))                               [B,N,128] query network (Eq. 3)
    U_{k,c} = softmax_k( <q_k, q_m_c> / √128 )                    [B,C,N]   distance-based attention (Eq. 4)
    b_c = Σ_k U_{k,c} x_k                                         [B,C,D]   (value = identity, upstream default)
    c_b = Conv1d(C, C, kernel=D)(b)                               [B,C]     bag classifier (Eq. 5)
    logits = (c_b + max_k c_k) / 2                                [B,C]     (Eq. 6, both streams combined)

Training in the paper averages the two streams' losses; here the task loss sees the averaged logits (the
combination used at test time). Both streams are kept in ``extras`` (``bag_logits``, ``max_instance_logits``,
``instance_logits`` ``[B,N,C]``) for a trainer that wants the paper's two-term loss.
attention ``[B,C,N]`` (one distribution per class).
"""

from __future__ import annotations

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input, masked_softmax


class DSMIL(MILModel):
    """DSMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput``."""

    def __init__(self, in_dim: int, n_out: int, query_dim: int = 128) -> None:
        super().__init__()
        self.in_dim, self.query_dim = in_dim, query_dim
        self.instance_classifier = nn.Linear(in_dim, n_out)
        self.query = nn.Sequential(
            nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.bag_classifier = nn.Conv1d(n_out, n_out, kernel_size=in_dim)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D]`` -> MILOutput."""
        mask = check_bag_input(x, self.in_dim, mask, "DSMIL")
        instance_logits = self.instance_classifier(x)  # [B,N,C]
        masked = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = masked.max(dim=1)  # [B,C], [B,C]
        queries = self.query(x)  # [B,N,Q]
        critical_queries = torch.gather(queries, 1, critical.unsqueeze(-1).expand(-1, -1, self.query_dim))  # [B,C,Q]
        scores = torch.einsum("bcq,bnq->bcn", critical_queries, queries) / self.query_dim**0.5  # [B,C,N]
        scores = scores.masked_fill(~mask.unsqueeze(1), 0.0)
        weights = masked_softmax(scores, mask)  # [B,C,N]
        bag_features = torch.einsum("bcn,bnd->bcd", weights, x)  # [B,C,D]
        bag_logits = self.bag_classifier(bag_features).squeeze(-1)  # [B,C]
        logits = 0.5 * (bag_logits + max_logits)
        extras = {
            "attention_logits": scores,
            "bag_logits": bag_logits,
            "max_instance_logits": max_logits,
            "instance_logits": instance_logits,
            "critical_index": critical,
        }
        return MILOutput(logits, weights, extras=extras)


@register_model("dsmil")
def build_dsmil(in_dim: int, n_out: int, **kwargs) -> DSMIL:
    """DSMIL with the upstream defaults (query width 128, identity value, Conv1d bag classifier)."""
    return DSMIL(in_dim, n_out, **kwargs)
