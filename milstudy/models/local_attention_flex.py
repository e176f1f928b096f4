"""FlexAttention backend of the 2-D local and full-ALiBi attention (``backend="flex"``; meant for CUDA).

Same semantics as :func:`milstudy.models.local_attention.local_attention_2d` and
:func:`~milstudy.models.local_attention.full_attention_2d_alibi` (spec ``shared/specs/longmil.md`` §2.3): keys
within Euclidean radius r (distance <= r kept, every head masked), bias ``-m_h ||p_i - p_j||``, padding tokens
neither queries nor keys (their output rows are 0). Built on PyTorch's FlexAttention
(:func:`torch.nn.attention.flex_attention.flex_attention`):

1. each bag's tokens are put in Morton (Z-) order of their grid position, padding last, and the sequence is padded
   to a multiple of the block size, so that a block of ``block`` consecutive tokens covers a compact patch of tissue;
2. the block mask is built from the blocks' bounding boxes (a query block meets a key block when the rectangles
   are within r: exact pruning, every pair within r lies in a kept block; :func:`block_keep`), with no N x N tensor;
3. the mask and the ALiBi bias are a ``mask_mod`` / ``score_mod`` on the sorted grid positions;
4. the output is put back in the caller's token order.

On CUDA the compiled kernel runs (fused, memory linear in N, forward and backward). On CPU PyTorch's FlexAttention
has no backward and its eager forward materialises the N x N scores: there it serves the tests only (the
forward against the dense oracle); ``backend="torch"`` (the default) is the tested path on every device. The
spec §3 variants of the released code (``distance="floor"``, ``beyond``, attention dropout) exist only there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["flex_attention_2d", "morton_order", "block_keep", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 128  # FlexAttention's default block size (tokens per query / key block)
_COMPILED = {}


def morton_order(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[N]`` permutation putting the valid tokens of ``positions [N, 2]`` (non-negative integers < 2^15) in
    Morton order (bits of x and y interleaved), ties by index, padding tokens last."""
    code = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    x, y = positions[:, 0].to(torch.long), positions[:, 1].to(torch.long)
    for bit in range(15):
        code |= ((x >> bit) & 1) << (2 * bit + 1) | ((y >> bit) & 1) << (2 * bit)
    code = torch.where(valid, code, torch.full_like(code, 1 << 31))
    return torch.argsort(code, stable=True)


def block_keep(positions: torch.Tensor, valid: torch.Tensor, radius: Optional[float], block: int) -> torch.Tensor:
    """``[B, n_blocks, n_blocks]`` bool: query block i may attend to key block j, for sorted ``positions [B, N, 2]``
    (N a multiple of ``block``) and ``valid [B, N]``: both blocks hold a valid token and (with a radius) their
    bounding boxes lie within r of each other (exact: every valid pair within r is in a kept block)."""
    B, N, _ = positions.shape
    n_blocks = N // block
    pos = positions.to(torch.long).view(B, n_blocks, block, 2)
    ok = valid.view(B, n_blocks, block, 1)
    big = 1 << 29  # beyond any grid position; the sum of two squared gaps still fits in int64
    low = torch.where(ok, pos, big).amin(2)  # [B, n_blocks, 2]; blocks without valid tokens get low > high
    high = torch.where(ok, pos, -big).amax(2)
    occupied = valid.view(B, n_blocks, block).any(-1)
    keep = occupied[:, :, None] & occupied[:, None, :]
    if radius is None:
        return keep
    gap = torch.clamp(torch.maximum(low[:, :, None] - high[:, None, :], low[:, None, :] - high[:, :, None]), min=0)
    return keep & ((gap * gap).sum(-1) <= int(math.floor(radius * radius)))


def _flex():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    return BlockMask, flex_attention


def _kernel(device: torch.device):
    """The compiled FlexAttention on CUDA (compiled once per process), the eager one elsewhere."""
    _, flex_attention = _flex()
    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(flex_attention)
    return _COMPILED["cuda"]


def flex_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      radius: Optional[float], slopes: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """2-D local (``radius``) or full (``radius=None``) attention with optional ALiBi ``slopes [h]`` through
    FlexAttention; inputs already checked by the caller (``positions [B, N, 2]`` long, ``mask [B, N]`` or None).
    Returns ``[B, h, N, d_v]`` in the input order (module docstring)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("backend='flex' has no backward on CPU (PyTorch's FlexAttention); train with "
                                  "backend='torch', or use flex on CUDA")
    BlockMask, _ = _flex()
    B, h, N, d = q.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if mask is None else mask
    padded = -(-max(N, 1) // block) * block
    order = torch.stack([morton_order(positions[b] - positions[b][valid[b]].amin(0) if bool(valid[b].any())
                                      else positions[b], valid[b]) for b in range(B)])  # [B, N]
    extra = padded - N

    def sort(t: torch.Tensor) -> torch.Tensor:  # [B, h, N, e] -> sorted, padded [B, h, padded, e]
        t = t.gather(2, order[:, None, :, None].expand(B, t.shape[1], N, t.shape[-1]))
        return torch.nn.functional.pad(t, (0, 0, 0, extra))

    pos = torch.nn.functional.pad(positions.gather(1, order[:, :, None].expand(B, N, 2)), (0, 0, 0, extra))
    ok = torch.nn.functional.pad(valid.gather(1, order), (0, extra), value=False)
    keep = block_keep(pos, ok, radius, block)  # [B, nb, nb]
    counts = keep.sum(-1, dtype=torch.int32)[:, None]  # [B, 1, nb]
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
    px, py = pos[..., 0].contiguous(), pos[..., 1].contiguous()
    r2 = None if radius is None else int(math.floor(radius * radius))

    def mask_mod(b, head, qi, ki):
        allowed = ok[b, qi] & ok[b, ki]
        if r2 is None:
            return allowed
        dx, dy = px[b, qi] - px[b, ki], py[b, qi] - py[b, ki]
        return allowed & (dx * dx + dy * dy <= r2)

    score_mod = None
    if slopes is not None:
        slope = slopes.to(q.dtype)

        def score_mod(score, b, head, qi, ki):
            dx, dy = px[b, qi] - px[b, ki], py[b, qi] - py[b, ki]
            return score - slope[head] * (dx * dx + dy * dy).to(score.dtype).sqrt()

    block_mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block, mask_mod=mask_mod,
                                          seq_lengths=(padded, padded))
    out = _kernel(q.device)(sort(q), sort(k), sort(v), score_mod=score_mod, block_mask=block_mask)
    out = out[:, :, :N] * ok[:, None, :N, None]  # padded query rows (every key masked) are exactly 0
    inverse = torch.argsort(order, dim=1)
    return out.gather(2, inverse[:, None, :, None].expand(B, h, N, out.shape[-1]))
