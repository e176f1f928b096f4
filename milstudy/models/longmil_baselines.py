"""The LongMIL paper's position baselines (specs/longmil.md §2.3, §4.3), on the same grid positions as LongMIL:

- ``fsa_rope`` ("Full Attention (RoFormer)"): 2 pre-LN full self-attention blocks with 2-D rotary position
  embedding: each head's dimensions are split in halves, 1-D RoPE (base 10000) with the grid column u on the
  first half and the row v on the second (our choice, spec §2.3), so ``<R_p q, R_p' k>`` depends only on p - p'.
- ``abs_pe_mil``: a learned absolute 2-D position embedding (a table per axis, ``max_position`` entries; positions
  beyond the table **clamp** to its last entry: the extrapolation failure spec §4.3 looks for) added after the
  input projection, then 2 pre-LN full-attention blocks without positional bias.

Both: ``Linear(d_in, dim) + ReLU`` input projection, mean readout -> LayerNorm -> Linear, ``needs_coords``
(positions from level-0 coordinates as :func:`milstudy.models.longmil.grid_positions`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input
from milstudy.models.longmil import _Block, grid_positions


def rope_2d(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [B, h, N, d]`` (d divisible by 4) by 2-D RoPE: first half of d by the column u, second half by
    the row v (``positions [B, N, 2]`` = (u, v)), pairs (2i, 2i+1) rotated by ``pos * base^(-2i/(d/2))``."""
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"rope_2d: the head dimension must be divisible by 4, got {d}")
    half = d // 2
    inv_freq = base ** (-torch.arange(0, half, 2, dtype=torch.float64, device=x.device) / half)  # [half/2]
    out = []
    for axis, part in enumerate((x[..., :half], x[..., half:])):
        angle = positions[..., axis].to(torch.float64).unsqueeze(-1) * inv_freq  # [B, N, half/2]
        cos, sin = angle.cos().to(x.dtype).unsqueeze(1), angle.sin().to(x.dtype).unsqueeze(1)  # [B, 1, N, half/2]
        even, odd = part[..., 0::2], part[..., 1::2]
        out.append(torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2))
    return torch.cat(out, -1)


class _FullBlock(_Block):
    """LongMIL's pre-LN block with full masked self-attention (no ALiBi), optionally 2-D RoPE on q and k."""

    def __init__(self, dim: int, heads: int, rope: bool, mlp_ratio: float = 4.0) -> None:
        super().__init__(dim, heads, None, mlp_ratio, alibi=False, slope_scale=1.0, dropout=0.0)
        self.rope = rope

    def attend(self, q, k, v, positions, mask):
        if self.rope:
            q, k = rope_2d(q, positions), rope_2d(k, positions)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


class PositionalFullMIL(MILModel):
    """Full-attention MIL with 2-D RoPE (``position="rope"``) or a learned absolute 2-D embedding (``"absolute"``)."""

    needs_coords = True
    permutation_invariant = False  # in x alone; permuting tokens with their coordinates keeps the logits

    def __init__(self, in_dim: int, n_out: int, position: str = "rope", dim: int = 384, heads: int = 1,
                 layers: int = 2, max_position: int = 128, stride: float | None = None) -> None:
        super().__init__()
        if position not in ("rope", "absolute"):
            raise ValueError(f"position must be 'rope' or 'absolute', got {position!r}")
        self.in_dim, self.position, self.stride, self.max_position = in_dim, position, stride, max_position
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        if position == "absolute":
            self.embed_u, self.embed_v = nn.Embedding(max_position, dim), nn.Embedding(max_position, dim)
            nn.init.normal_(self.embed_u.weight, std=0.02)
            nn.init.normal_(self.embed_v.weight, std=0.02)
        self.blocks = nn.ModuleList(_FullBlock(dim, heads, rope=position == "rope") for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                **_: object) -> MILOutput:
        mask = check_bag_input(x, self.in_dim, mask, type(self).__name__)
        positions, strides = grid_positions(coords, mask, self.stride)
        h = self.project(x)
        extras = {"grid_stride": strides}
        if self.position == "absolute":
            clamped = positions.clamp(max=self.max_position - 1)
            extras["clamped_share"] = (positions >= self.max_position).any(-1)[mask].float().mean()
            h = h + self.embed_u(clamped[..., 0]) + self.embed_v(clamped[..., 1])
        h = h * mask.unsqueeze(-1)
        for block in self.blocks:
            h = block(h, positions, mask)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return MILOutput(self.head(self.norm(pooled)), extras=extras)


@register_model("fsa_rope")
def fsa_rope(in_dim: int, n_out: int, **kwargs) -> PositionalFullMIL:
    return PositionalFullMIL(in_dim, n_out, position="rope", **kwargs)


@register_model("abs_pe_mil")
def abs_pe_mil(in_dim: int, n_out: int, **kwargs) -> PositionalFullMIL:
    return PositionalFullMIL(in_dim, n_out, position="absolute", **kwargs)
