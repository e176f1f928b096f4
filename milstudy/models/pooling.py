"""Mean and max MIL pooling baselines (embedding-level pooling; Ilse et al. 2018 §2.3, Wang et al. 2018 mi-Net).

    h_k = Drop(ReLU(W_e x_k))              [B,N,L]
    z   = mean_k h_k  |  max_k h_k         [B,L]    (over real instances only)
    logits = W_c z                         [B,C]

Mean pooling reports its implicit attention (uniform 1/N over real instances, ``[B,1,N]``); max pooling has no
attention distribution (``attention=None``) and reports in ``extras["argmax_share"]`` ``[B,1,N]`` the fraction of
embedding channels whose maximum each instance holds.
"""

from __future__ import annotations

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input


class PoolingMIL(MILModel):
    """Embedding + mean or max pooling + linear classifier; ``forward(x [B,N,D], coords, mask)``."""

    def __init__(self, in_dim: int, n_out: int, mode: str, hidden_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        if mode not in ("mean", "max"):
            raise ValueError(f"pooling mode must be 'mean' or 'max', got {mode!r}")
        self.in_dim, self.mode = in_dim, mode
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, n_out)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D]`` -> MILOutput."""
        mask = check_bag_input(x, self.in_dim, mask, f"{self.mode}_pooling")
        h = self.embed(x)  # [B,N,L]
        if self.mode == "mean":
            weights = (mask / mask.sum(dim=1, keepdim=True)).to(h.dtype).unsqueeze(1)  # [B,1,N]
            bag = torch.einsum("bhn,bnl->bl", weights, h)
            return MILOutput(self.classifier(bag), weights, extras={"bag_embedding": bag})
        bag, argmax = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1)  # [B,L]
        share = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)
        share.scatter_add_(1, argmax, torch.full_like(bag, 1.0 / bag.shape[1]))
        return MILOutput(self.classifier(bag), None, extras={"bag_embedding": bag, "argmax_share": share[:, None]})


@register_model("mean_pooling")
def build_mean_pooling(in_dim: int, n_out: int, **kwargs) -> PoolingMIL:
    """Mean pooling of instance embeddings."""
    return PoolingMIL(in_dim, n_out, mode="mean", **kwargs)


@register_model("max_pooling")
def build_max_pooling(in_dim: int, n_out: int, **kwargs) -> PoolingMIL:
    """Max pooling of instance embeddings."""
    return PoolingMIL(in_dim, n_out, mode="max", **kwargs)
