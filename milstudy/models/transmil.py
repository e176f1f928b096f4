"""TransMIL: transformer-based correlated MIL (Shao et al. 2021, NeurIPS, §3.3-3.4, Algorithm 1 "TPT").

    H = ReLU(W_fc X)                                   [B,n,512]
    H ← [H, H_{1..s²-n}],  s = ⌈√n⌉                     [B,s²,512]   square padding by repetition
    H ← [cls, H]                                       [B,1+s²,512]
    H ← H + Nyström(LN(H))                             layer 1 (8 heads, 256 landmarks, pinv 6 iterations;
                                                       exact attention when 1+s² <= 256, see TransLayer)
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
batch is run over each bag's real instances, in groups of bags that share the grid side s (one forward per group);
a padded batch therefore equals the bags run one at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import NystromAttention, check_bag_input


class TransLayer(nn.Module):
    """Pre-LN Nyström attention block with residual: ``[B,L,dim] -> [B,L,dim]``.

    ``exact_short``: a sequence of at most ``landmarks`` tokens gets exact softmax attention, softmax(QKᵀ/√d)V plus
    the same depthwise-conv residual and output projection: the limit Nyström approximates when every token is its
    own landmark (``test_nystrom_equals_exact_attention_when_every_token_is_a_landmark``). The authors' code instead
    zero-pads such a sequence to ``landmarks`` tokens, which lets the zero tokens take part in every softmax and
    inverts a landmarks x landmarks kernel per head (seconds per small bag on a CPU); ``exact_short=False`` keeps
    that. Longer sequences always use Nyström. Memory stays O(landmarks²) per head either way.
    """

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float, exact_short: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads=heads, landmarks=landmarks, dropout=dropout)
        self.exact_short = exact_short

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_short and x.shape[1] <= self.attention.landmarks:
            return x + self._exact_attention(self.norm(x))
        return x + self.attention(self.norm(x))

    def _exact_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Exact multi-head attention with the Nyström layer's weights: ``[B,L,dim] -> [B,L,dim]``."""
        attention = self.attention
        q, k, v = attention.split_heads(x)  # [B,h,L,dh], q already scaled by 1/√d
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v + attention.residual_conv(v)
        return attention.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

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


class TransMIL(MILModel):
    """TransMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` with attention ``[B,1,N]``."""

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 512,
        heads: int = 8,
        landmarks: int | None = None,
        dropout: float = 0.1,
        exact_short: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        landmarks = landmarks or dim // 2
        self.layer1 = TransLayer(dim, heads, landmarks, dropout, exact_short)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout, exact_short)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_out)

    def _forward_same_side(
        self, x: torch.Tensor, mask: torch.Tensor, side: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bags whose real instances fill the same ``side x side`` grid, run together.

        x ``[G,N,D]``, mask ``[G,N]`` -> logits ``[G,C]``, per-head CLS weights folded onto the instances ``[G,h,N]``
        (0 on padded positions) and the CLS logits of each instance's first copy ``[G,h,N]``. Every operation after
        the gather acts on each bag alone, so this equals running the bags one at a time over their real instances.
        """
        n_real = mask.sum(dim=1).tolist()
        index = torch.stack([  # token -> position in N: the real instances, then repeated from the first one
            real[torch.cat([torch.arange(n), torch.arange(side * side - n)]).to(x.device)]
            for real, n in zip((row.nonzero().squeeze(1) for row in mask), n_real)
        ])  # [G,s²]
        h = self.fc(x)
        h = torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [G,s²,dim] repetition padding
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(h.dtype), h], dim=1)  # [G,1+s²,dim]
        h = self.ppeg(self.layer1(h), side)
        scores = self.layer2.cls_scores(h)  # [G,h,1+s²]
        token_weights = torch.softmax(scores, dim=-1)[:, :, 1:]  # CLS->instance tokens
        heads = token_weights.shape[1]
        folded = torch.zeros(x.shape[0], heads, x.shape[1], dtype=h.dtype, device=h.device)
        folded.scatter_add_(2, index.unsqueeze(1).expand(-1, heads, -1), token_weights)
        per_head = folded / folded.sum(dim=-1, keepdim=True)  # [G,h,N]
        first_scores = torch.zeros_like(per_head)
        for row, n in enumerate(n_real):  # the first n tokens are the real instances, in order
            first_scores[row, :, index[row, :n]] = scores[row, :, 1 : n + 1]
        h = self.norm(self.layer2(h))[:, 0]  # [G,dim]
        return self.classifier(h), per_head, first_scores

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D]`` -> MILOutput (coords unused: TransMIL's positions are the instance order).

        A padded batch is split into groups of bags with the same grid side ⌈√n⌉ (one forward per group; bags
        longer than the landmarks one at a time), which equals running the bags one at a time.
        """
        mask = check_bag_input(x, self.in_dim, mask, "TransMIL")
        sides = torch.ceil(torch.sqrt(mask.sum(dim=1).double())).long()
        if bool((sides == sides[0]).all()):
            logits, per_head, scores = self._forward_same_side(x, mask, int(sides[0]))
        else:
            batch, n_max = mask.shape
            per_head = x.new_zeros(batch, self.layer2.attention.heads, n_max)
            scores = torch.zeros_like(per_head)
            logits = x.new_zeros(batch, self.classifier.out_features)
            for side in sides.unique().tolist():
                rows = (sides == side).nonzero().squeeze(1)
                # Nyström's pinv is scaled by a maximum over the whole batch: long bags go one at a time
                exact = self.layer1.exact_short and 1 + side * side <= self.layer1.attention.landmarks
                for group in [rows] if exact else rows.split(1):
                    logits_g, per_head[group], scores[group] = self._forward_same_side(x[group], mask[group], side)
                    logits = logits.index_copy(0, group, logits_g)
        extras = {"attention_logits": scores, "cls_attention_per_head": per_head}
        return MILOutput(logits, per_head.mean(dim=1, keepdim=True), extras=extras)


@register_model("transmil")
def build_transmil(in_dim: int, n_out: int, **kwargs) -> TransMIL:
    """TransMIL with the paper's defaults (512 wide, 8 heads, 256 landmarks, two Nyström layers + PPEG).

    Bags whose 1 + s² tokens are no more than the landmarks get exact attention (``exact_short=True``, see
    ``TransLayer``); ``exact_short=False`` zero-pads them to the landmark count as the authors' code does.
    """
    return TransMIL(in_dim, n_out, **kwargs)
