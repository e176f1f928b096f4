"""TransMIL: transformer-based correlated MIL (Shao et al. 2021, NeurIPS, §3.3-3.4, Algorithm 1 "TPT").

    H = ReLU(W_fc X)                                   [B,n,512]
    H ← [H, H_{1..s²-n}],  s = ⌈√n⌉                     [B,s²,512]   square padding by repetition
    H ← [cls, H]                                       [B,1+s²,512]
    H ← H + Nyström(LN(H))                             layer 1 (8 heads, 256 landmarks, pinv 6 iterations;
                                                       exact attention when 1+s² <= 256, see TransLayer)
    H ← PPEG(H): cls kept, tokens as an s x s image, I + DWConv7 + DWConv5 + DWConv3   (§3.4; one merged conv)
    H ← H + Nyström(LN(H))                             layer 2
    logits = W_c LN(H)_cls                             [B,C]

Attention exposed (spec abmilx.md §4.2, asmil.md §2.8; our choice): the exact last-layer CLS row
softmax(q_cls Kᵀ/√d) over the layer-2 tokens, from the q/k layer 2 computes anyway (O(n·d), never the full matrix
and not the Nyström approximation; with gradient), per head:

    s_t = q_cls·k_t/√d                              [B,heads,s²]   CLS -> instance-token logits of layer 2
    attention_logits_i = logsumexp_{t copy of i} s_t [B,heads,n]   the copies of a repeated instance folded
    attention = masked_softmax(attention_logits)     [B,heads,n]   = the CLS row folded onto the instances and
                                                                    renormalised over them (CLS->CLS dropped)

so the identity ``masked_softmax(attention_logits, mask) == attention`` is exact. Attention stays per head
(analyses take the head mean); ``attention_logits`` is ``PAD_LOGIT`` on padding.

Not permutation invariant (PPEG convolves the order-as-image layout and the Nyström landmarks are segment means),
so ``permutation_invariant = False``. Masking: the repetition padding depends on each bag's own n, so a padded
batch is run over each bag's real instances, in groups of bags that share the grid side s (one forward per group);
a padded batch therefore equals the bags run one at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import (
    PAD_LOGIT,
    NystromAttention,
    check_bag_input,
    masked_softmax,
    pad_attention_logits,
)


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

    def forward(
        self, x: torch.Tensor, return_cls_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x ``[B,L,dim]`` -> ``[B,L,dim]``; with ``return_cls_logits`` also the exact CLS-row (token 0) attention
        logits q_cls·k_t/√d ``[B,heads,L]`` from the q/k of this forward (no second qkv projection), with gradient."""
        if self.exact_short and x.shape[1] <= self.attention.landmarks:
            out, cls_logits = self._exact_attention(self.norm(x))
        else:
            out, cls_logits = self.attention(self.norm(x), return_first_row_logits=True)
        return (x + out, cls_logits) if return_cls_logits else x + out

    def _exact_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact multi-head attention with the Nyström layer's weights: ``[B,L,dim]`` -> (``[B,L,dim]``, the
        first row of the logits ``[B,heads,L]``)."""
        attention = self.attention
        q, k, v = attention.split_heads(x)  # [B,h,L,dh], q already scaled by 1/√d
        scores = q @ k.transpose(-1, -2)  # [B,h,L,L]
        out = torch.softmax(scores, dim=-1) @ v + attention.residual_conv(v)
        return attention.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), scores[:, :, 0]


class PPEG(nn.Module):
    """Pyramid position encoding generator (Shao et al. §3.4): identity + depthwise convs 7, 5, 3 on the grid.

    The three convolutions (their own parameters, as in the authors' layout) and the identity are applied as one
    7 x 7 depthwise convolution whose kernel is their sum (the 5 x 5 and 3 x 3 kernels zero-padded to the centre,
    plus 1 at the centre), on the tokens' own channels-last layout: the same function and gradients, about 3x
    faster forward+backward on CPU than four passes (depthwise convolutions are slow there)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3)])

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight ``[dim,1,7,7]``, bias ``[dim]``) of identity + conv7 + conv5 + conv3 as one convolution."""
        weight = sum(F.pad(conv.weight, [(7 - conv.kernel_size[0]) // 2] * 4) for conv in self.convs)
        centre = torch.zeros_like(weight)
        centre[:, :, 3, 3] = 1.0
        return weight + centre, sum(conv.bias for conv in self.convs)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """x ``[B,1+side²,dim]`` -> same shape (cls token untouched)."""
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)  # [B,dim,s,s], channels-last
        weight, bias = self.merged_kernel()
        grid = F.conv2d(grid, weight.to(grid.dtype), bias.to(grid.dtype), padding=3, groups=grid.shape[1])
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(x.shape[0], side * side, -1)], dim=1)


def fold_copies_logsumexp(token_logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fold the logits of tokens that are copies of one instance into one logit per instance, by logsumexp.

    token_logits ``[G,h,T]``, index ``[G,T]`` (the position in N each token copies), mask ``[G,N]`` ->
    ``[G,h,N]`` with ``logit_i = log Σ_{t: index_t = i} exp(token_logit_t)`` (``PAD_LOGIT`` on padding), so a
    softmax over the instances equals the softmax over the tokens summed over each instance's copies. Stable (the
    per-instance maximum is factored out) and differentiable.
    """
    groups, heads, _ = token_logits.shape
    idx = index.unsqueeze(1).expand(-1, heads, -1)  # [G,h,T]
    top = token_logits.new_full((groups, heads, mask.shape[1]), float("-inf"))
    top = top.scatter_reduce(2, idx, token_logits, reduce="amax", include_self=True)
    top = top.masked_fill(~mask[:, None, :], 0.0)  # padding has no copy
    total = torch.zeros_like(top).scatter_add(2, idx, torch.exp(token_logits - top.gather(2, idx)))  # >= 1 if real
    return pad_attention_logits(top + torch.log(total.masked_fill(~mask[:, None, :], 1.0)), mask)


class TransMIL(MILModel):
    """TransMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` with attention and attention_logits
    ``[B,heads,N]`` (see the module docstring)."""

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
        (0 on padded positions) and their logits (logsumexp over each instance's copies, ``PAD_LOGIT`` on padding)
        ``[G,h,N]``. Every operation after the gather acts on each bag alone, so this equals running the bags one at
        a time over their real instances.
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
        h, cls_logits = self.layer2(h, return_cls_logits=True)  # [G,1+s²,dim], [G,heads,1+s²]
        logits = fold_copies_logsumexp(cls_logits[:, :, 1:], index, mask)  # CLS->instance tokens: [G,heads,N]
        return self.classifier(self.norm(h)[:, 0]), masked_softmax(logits, mask), logits

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
            logits, attention, attention_logits = self._forward_same_side(x, mask, int(sides[0]))
        else:
            batch, n_max = mask.shape
            attention = x.new_zeros(batch, self.layer2.attention.heads, n_max)
            attention_logits = torch.full_like(attention, PAD_LOGIT)
            logits = x.new_zeros(batch, self.classifier.out_features)
            for side in sides.unique().tolist():
                rows = (sides == side).nonzero().squeeze(1)
                # Nyström's pinv is scaled by a maximum over the whole batch: long bags go one at a time
                exact = self.layer1.exact_short and 1 + side * side <= self.layer1.attention.landmarks
                for group in [rows] if exact else rows.split(1):
                    logits_g, attention_g, attention_logits_g = self._forward_same_side(x[group], mask[group], side)
                    logits = logits.index_copy(0, group, logits_g)
                    attention = attention.index_copy(0, group, attention_g)
                    attention_logits = attention_logits.index_copy(0, group, attention_logits_g)
        return MILOutput(logits, attention, attention_logits=attention_logits)


@register_model("transmil")
def build_transmil(in_dim: int, n_out: int, **kwargs) -> TransMIL:
    """TransMIL with the paper's defaults (512 wide, 8 heads, 256 landmarks, two Nyström layers + PPEG).

    Bags whose 1 + s² tokens are no more than the landmarks get exact attention (``exact_short=True``, see
    ``TransLayer``); ``exact_short=False`` zero-pads them to the landmark count as the authors' code does.
    """
    return TransMIL(in_dim, n_out, **kwargs)
