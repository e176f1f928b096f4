"""TransMIL: transformer-based correlated MIL (Shao et al. 2021, NeurIPS, §3.3-3.4, Algorithm 1 "TPT").

    H = ReLU(W_fc X)                                   [B,n,512]
    H ← [H, H_{1..s²-n}],  s = ⌈√n⌉                     [B,s²,512]   square padding by repetition
    H ← [cls, H]                                       [B,1+s²,512]
    H ← H + Nyström(LN(H))                             layer 1 (8 heads, 256 landmarks, pinv 6 iterations)
    H ← PPEG(H): cls kept, tokens as an s x s image, I + DWConv7 + DWConv5 + DWConv3   (§3.4)
    H ← H + Nyström(LN(H))                             layer 2
    logits = W_c LN(H)_cls                             [B,C]

Attention exposed for analyses (spec abmilx.md §4.2, our choice): the exact last-layer CLS row
softmax(q_cls Kᵀ/√d) over the layer-2 tokens (O(n), never the full matrix; computed without gradient), the
weights of repeated copies folded back onto their source instance and renormalised over the n instances,
averaged over heads -> ``attention [B,1,n]``; per head in ``extras["cls_attention_per_head"] [B,8,n]``; the raw
CLS logits of each instance's first copy in ``extras["attention_logits"] [B,8,n]``.

Not permutation invariant (PPEG convolves the order-as-image layout and the Nyström landmarks are segment means),
so ``permutation_invariant = False``. Masking: the repetition padding depends on each bag's own n, so a padded
batch is run bag by bag over its real instances; a padded batch therefore equals the bags run one at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from milstudy.models.base import MILOutput, register_model
from milstudy.models.layers import NystromAttention, check_bag_input


class TransLayer(nn.Module):
    """Pre-LN Nyström attention block with residual: ``[B,L,dim] -> [B,L,dim]``."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads=heads, landmarks=landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(x))

    @torch.no_grad()
    def cls_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Exact CLS-row attention logits q_cls·k_j/√d over all tokens: x ``[B,L,dim]`` -> ``[B,heads,L]``."""
        q, k, _ = self.attention.split_heads(self.norm(x))  # q already scaled by 1/√d
        return torch.einsum("bhd,bhld->bhl", q[:, :, 0], k)


class PPEG(nn.Module):
    """Pyramid position encoding generator (Shao et al. §3.4): identity + depthwise convs 7, 5, 3 on the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3)])

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """x ``[B,1+side²,dim]`` -> same shape (cls token untouched)."""
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # [B,dim,s,s]
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` with attention ``[B,1,N]``."""

    needs_targets = False
    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 512,
        heads: int = 8,
        landmarks: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        landmarks = landmarks or dim // 2
        self.layer1 = TransLayer(dim, heads, landmarks, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_out)

    def _forward_equal_bags(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bags of equal size n without padding: x ``[B,n,D]`` -> logits, per-head weights and logits ``[B,h,n]``."""
        n = x.shape[1]
        side = math.ceil(math.sqrt(n))
        source = torch.cat([torch.arange(n), torch.arange(side * side - n)]).to(x.device)  # token -> instance
        h = self.fc(x)[:, source]  # [B,s²,dim] repetition padding
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(h.dtype), h], dim=1)  # [B,1+s²,dim]
        h = self.ppeg(self.layer1(h), side)
        scores = self.layer2.cls_scores(h)  # [B,h,1+s²]
        token_weights = torch.softmax(scores, dim=-1)[:, :, 1:]  # CLS->instance tokens
        folded = torch.zeros(*token_weights.shape[:2], n, dtype=h.dtype, device=h.device)
        folded.index_add_(2, source, token_weights)
        per_head = folded / folded.sum(dim=-1, keepdim=True)  # [B,h,n]
        h = self.norm(self.layer2(h))[:, 0]  # [B,dim]
        return self.classifier(h), per_head, scores[:, :, 1 : n + 1]

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D]`` -> MILOutput (coords unused: TransMIL's positions are the instance order)."""
        mask = check_bag_input(x, self.in_dim, mask, "TransMIL")
        if bool(mask.all()):
            logits, per_head, scores = self._forward_equal_bags(x)
        else:  # bag by bag over the real instances (see module docstring)
            batch, n_max = mask.shape
            per_head = x.new_zeros(batch, self.layer2.attention.heads, n_max)
            scores = torch.zeros_like(per_head)
            rows = []
            for b in range(batch):
                bag_logits, bag_weights, bag_scores = self._forward_equal_bags(x[b : b + 1, mask[b]])
                rows.append(bag_logits)
                per_head[b, :, mask[b]] = bag_weights[0]
                scores[b, :, mask[b]] = bag_scores[0]
            logits = torch.cat(rows)
        extras = {"attention_logits": scores, "cls_attention_per_head": per_head}
        return MILOutput(logits, per_head.mean(dim=1, keepdim=True), extras=extras)


@register_model("transmil")
def build_transmil(in_dim: int, n_out: int, **kwargs) -> TransMIL:
    """TransMIL with the paper's defaults (512 wide, 8 heads, 256 landmarks, two Nyström layers + PPEG)."""
    return TransMIL(in_dim, n_out, **kwargs)
