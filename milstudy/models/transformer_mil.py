"""ViTMIL and QAMIL: the transformer aggregators of the ABMILX paper's Table 5 (Tang, Qin et al. 2025, Sec. 4.3).

The paper gives only their shape (specs/abmilx.md §2.5): **ViTMIL** is two self-attention layers with [CLS]
pooling, **QAMIL** one multi-head attention layer whose query is learnable. The rest is our choice, as the spec
records: 8 heads, width ``dim``, pre-LayerNorm blocks, MLP ratio 4, an input projection Linear -> GELU -> dropout
0.25 as in ABMIL, no positional encoding (both are permutation invariant).

Attention reported in ``MILOutput.attention`` ``[B, heads, N]``: QAMIL's query weights exactly; for ViTMIL the
[CLS] row of the last layer restricted to the instances and renormalised (the [CLS]-to-[CLS] weight is dropped).
``attention_logits`` ``[B, heads, N]``: the scores q·k/√d those softmaxes normalise (for ViTMIL the last layer's
[CLS]-to-instance scores, from the q/k that layer computes anyway), with gradient. One query token per model here;
a variant with several query tokens would flatten (query, head) into the heads axis, query-major.
ViTMIL is quadratic in N by design; it runs through torch's fused scaled-dot-product attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input, masked_softmax, pad_attention_logits


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads * d] -> [B, heads, T, d]``."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


class _MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class _SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``; padded keys are masked."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = _MLP(dim, mlp_ratio, dropout)

    def forward(
        self, x: torch.Tensor, keys: torch.Tensor, return_first_row_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x ``[B,T,dim]``, keys ``[B,T]`` (False = padded key) -> ``[B,T,dim]``; with ``return_first_row_logits``
        also the exact attention logits of token 0 ([CLS]) over all tokens, q_0·k_t/√d ``[B,heads,T]``, from the
        q/k the attention uses (O(T) extra work and memory, with gradient)."""
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        x = x + self.proj(out.transpose(1, 2).flatten(2))
        x = x + self.mlp(self.norm2(x))
        if not return_first_row_logits:
            return x
        return x, (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(q.shape[-1])  # [B,heads,T]


def _input_projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout))


class ViTMIL(MILModel):
    """ViTMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` with attention ``[B,heads,N]``.

    extras: ``bag_embedding`` ``[B,dim]`` (the final [CLS] token after LayerNorm).
    """

    def __init__(self, in_dim: int, n_out: int, dim: int = 512, heads: int = 8, layers: int = 2,
                 mlp_ratio: float = 4.0, dropout: float = 0.25) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViTMIL: dim={dim} must be divisible by heads={heads}")
        self.in_dim = in_dim
        self.embed = _input_projection(in_dim, dim, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(_SelfAttentionBlock(dim, heads, mlp_ratio, 0.0) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bag_input(x, self.in_dim, mask, "vitmil")
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), self.embed(x)], dim=1)
        keys = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        for block in self.blocks[:-1]:
            tokens = block(tokens, keys)
        tokens, row_logits = self.blocks[-1](tokens, keys, return_first_row_logits=True)
        logits = pad_attention_logits(row_logits[..., 1:], mask)  # [B, heads, N]: CLS->instance, CLS column dropped
        attention = masked_softmax(logits, mask)  # the CLS row renormalised over the instances
        bag = self.norm(tokens[:, 0])
        return MILOutput(self.classifier(bag), attention, attention_logits=logits, extras={"bag_embedding": bag})


class QAMIL(MILModel):
    """QAMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` with attention ``[B,heads,N]``.

    A learnable query attends over the instances (pre-LN keys and values), then ``q + MLP(LN(q))``.
    extras: ``bag_embedding`` ``[B,dim]``.
    """

    def __init__(self, in_dim: int, n_out: int, dim: int = 512, heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.25) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"QAMIL: dim={dim} must be divisible by heads={heads}")
        self.in_dim, self.heads = in_dim, heads
        self.embed = _input_projection(in_dim, dim, dropout)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_kv, self.norm_q = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_mlp, self.mlp = nn.LayerNorm(dim), _MLP(dim, mlp_ratio, 0.0)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bag_input(x, self.in_dim, mask, "qamil")
        h = self.norm_kv(self.embed(x))
        query = self.query.expand(x.shape[0], -1, -1).to(x.dtype)
        q = _split_heads(self.q(self.norm_q(query)), self.heads)  # [B, heads, 1, d]
        k, v = (_split_heads(t, self.heads) for t in self.kv(h).chunk(2, dim=-1))
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(q.shape[-1])  # [B, heads, N]
        logits = pad_attention_logits(logits, mask)
        attention = masked_softmax(logits, mask)
        pooled = (attention.unsqueeze(2) @ v).transpose(1, 2).flatten(2)  # [B, 1, dim]
        token = query + self.proj(pooled)
        token = token + self.mlp(self.norm_mlp(token))
        bag = self.norm(token[:, 0])
        return MILOutput(self.classifier(bag), attention, attention_logits=logits, extras={"bag_embedding": bag})


@register_model("vitmil")
def build_vitmil(in_dim: int, n_out: int, **kwargs) -> ViTMIL:
    """ViTMIL (ABMILX paper Table 5): two pre-LN self-attention layers with [CLS] pooling."""
    return ViTMIL(in_dim, n_out, **kwargs)


@register_model("qamil")
def build_qamil(in_dim: int, n_out: int, **kwargs) -> QAMIL:
    """QAMIL (ABMILX paper Table 5): one multi-head attention layer with a learnable query."""
    return QAMIL(in_dim, n_out, **kwargs)
