"""Exact 2-D local attention (and chunked full attention) with 2-D ALiBi in memory linear in N.

LongMIL (Li et al., NeurIPS 2024, ``shared/papers/004_cf96cfc6d2df712f.txt``), paper Eqs. 10-14; our spec
``shared/specs/longmil.md`` §2.3 (semantics) and §2.4 (the tiled algorithm; the authors never released theirs).

For head h, with ``D_ij = ||p_i - p_j||_2`` on integer grid positions p and scale ``1/sqrt(d)`` (spec §2.3):

    S_ij = q_i . k_j / sqrt(d) - m_h D_ij   if D_ij <= r (tie kept; tested as dx^2+dy^2 <= r^2), else -inf
    O_i  = softmax_j(S_i) V

for EVERY head (unlike the released code, spec §3.2) and without any N x N table (spec §3.1).

Algorithm (``local_attention_2d``): tokens are bucketed into square tiles of side ``tile`` grid units; each
(query tile, key token) pair is kept only if the key lies within r of the tile's rectangle (exact pruning, so
the candidate set of a tile is its Minkowski sum with the disk). Query tiles are sorted by candidate count and
grouped into chunks of at most ``chunk_elems`` score entries, padded to the chunk's maxima. A custom
``autograd.Function`` computes each chunk's softmax in one shot (the candidate set is complete), saves only
O and the per-query log-sum-exp, and in backward recomputes P per chunk (FlashAttention-2 style:
``dV = P^T dO, dS = P (dO V^T - Delta), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)``), scatter-adding dK, dV.
Padded query rows get lse = +inf so that their P is exactly 0. Memory: O(N d + N (2R+1)^2) indices + one chunk.
Per chunk the scores are masked in place (no bias tensor without slopes) and exponentiated once (row max,
exp, row sum; lse = max + log sum). Costs: :func:`local_attention_pairs` (computed vs useful pairs), measured
by ``milstudy bench local-attention`` (``results/benchmarks/local_attention.md``).

``full_attention_2d_alibi``: exact query-chunked full attention with the unclipped Euclidean ALiBi computed per
chunk (time O(N^2 d), memory O(chunk * N)). ``dense_local_attention_2d``: the N x N oracle, for tests only.

Variants of the released code (spec §3; LongMIL ``preset="upstream"``), all computed per chunk, never as a table:
``distance="floor"`` uses ``floor(D_ij)`` in the bias (§3.3, all three functions); ``radius=`` with ``beyond=[h]``
in ``full_attention_2d_alibi`` (and the oracle) replaces the bias beyond r by a per-head constant (-inf masks
that head; a finite value keeps every key: §3.2 soft masks, §3.3 clipped ALiBi), so a head with a soft mask costs
O(N^2) time (memory still O(chunk * N)); ``dropout=p`` drops softmax weights (kept ones scaled 1/(1-p), §3.5) in
both kernels, the mask of each chunk drawn from ``dropout_seed`` + chunk index (default: a seed from torch's
global RNG) and regenerated in backward, so nothing N x N is stored.
Padding tokens (``mask`` False) are neither queries nor keys; their output rows and gradients are 0.
Slopes are treated as constants (no gradient).

``backend="flex"`` (both functions) runs the same attention through PyTorch's FlexAttention instead
(:mod:`milstudy.models.local_attention_flex`: Morton-ordered tokens, a block mask from the blocks' bounding boxes):
compiled and fused on CUDA; on CPU forward only, for the tests. It is opt-in: the default ``backend="torch"`` is
the tested path on every device, and flex has not yet been timed on a GPU in this project
(``python -m milstudy.bench.cuda_check`` does that); the spec §3 variants are torch-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = ["local_attention_2d", "full_attention_2d_alibi", "dense_local_attention_2d", "default_tile",
           "local_attention_pairs", "BACKENDS"]

Slopes = Optional[Union[torch.Tensor, Sequence[float]]]
DEFAULT_CHUNK_ELEMS = 1 << 18


def default_tile(radius: float) -> int:
    """Tile side in grid units: 8 for r >= 6 (computed/useful pairs ~2.2 at r = 10), else max(2, ceil(r))."""
    return 8 if radius >= 6 else max(2, int(math.ceil(radius)))


# ----------------------------------------------------------------------------------------------- validation
def _check(q, k, v, coords, mask, slopes, radius=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [B, h, N, d]; got {getattr(t, 'shape', type(t))}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v must match q [B, h, N, d] in B, h, N (and k in d) and dtype; got q {tuple(q.shape)}"
                         f", k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, h, N, _ = q.shape
    if not isinstance(coords, torch.Tensor) or coords.shape != (B, N, 2):
        raise ValueError(f"coords must be a tensor [B, N, 2] = [{B}, {N}, 2]; got {getattr(coords, 'shape', None)}")
    if coords.is_floating_point():
        if not bool(torch.all(coords == coords.round())):
            raise ValueError("coords must be integer grid positions; got non-integer values")
    elif coords.dtype == torch.bool or coords.is_complex():
        raise ValueError(f"coords must be an integer tensor; got {coords.dtype}")
    coords = coords.to(device=q.device, dtype=torch.long)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (B, N):
            raise ValueError(f"mask must be a bool tensor [B, N] = [{B}, {N}]; got {getattr(mask, 'shape', None)}")
        mask = mask.to(q.device)
    if slopes is not None:
        slopes = torch.as_tensor(slopes, dtype=q.dtype, device=q.device).detach()
        if slopes.shape != (h,):
            raise ValueError(f"slopes must have shape [h] = [{h}]; got {tuple(slopes.shape)}")
    if radius is not None:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
            raise ValueError(f"radius must be a finite number >= 0; got {radius!r}")
    return coords, mask, slopes


DISTANCES = ("euclidean", "floor")
BACKENDS = ("torch", "flex")


def _check_backend(backend: str, distance: str, dropout: float, beyond=None) -> bool:
    """True for ``backend="flex"`` (which takes only the paper's semantics), False for ``"torch"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "flex" and (distance != "euclidean" or dropout or beyond is not None):
        raise ValueError("backend='flex' computes the paper's attention only (distance='euclidean', no beyond, no "
                         f"dropout); got distance={distance!r}, dropout={dropout!r}, beyond={beyond!r}: use "
                         "backend='torch' for the spec §3 variants")
    return backend == "flex"


def _check_variant(h: int, q: torch.Tensor, distance: str, radius=None, beyond=None, dropout: float = 0.0,
                   dropout_seed: Optional[int] = None) -> tuple[Optional[torch.Tensor], Optional["_Dropout"]]:
    """Validate the spec §3 variant options; returns (beyond [h] or None, the dropout or None)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}")
    if beyond is not None:
        if radius is None:
            raise ValueError("beyond (the bias beyond the radius) needs a radius")
        beyond = torch.as_tensor(beyond, dtype=q.dtype, device=q.device).detach()
        if beyond.shape != (h,) or bool(torch.any(torch.isnan(beyond) | (beyond == float("inf")))):
            raise ValueError(f"beyond must be [h] = [{h}] values, finite or -inf; got {beyond.tolist()}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)
                                     or not 0 <= dropout_seed < 2 ** 62):
        raise ValueError(f"dropout_seed must be an int in [0, 2^62) or None; got {dropout_seed!r}")
    if dropout == 0:
        return beyond, None
    seed = int(torch.randint(0, 2 ** 62, (1,))) if dropout_seed is None else dropout_seed
    return beyond, _Dropout(float(dropout), seed)


def _bias(d2: torch.Tensor, slopes: Optional[torch.Tensor], r2: Optional[int], dtype, distance: str = "euclidean",
          beyond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[.., Q, K] integer squared distances -> [h or 1, .., Q, K] bias: -m_h D with D = sqrt(d2) (``"floor"``:
    floor(sqrt(d2)), exact in float64); where d2 > r2: -inf, or the per-head ``beyond [h]`` when given."""
    if slopes is None:
        bias = torch.zeros(d2.shape, dtype=dtype, device=d2.device).unsqueeze(0)
    else:
        dist = d2.to(dtype).sqrt_() if distance == "euclidean" else d2.to(torch.float64).sqrt_().floor_().to(dtype)
        bias = dist.unsqueeze(0) * (-slopes).view(-1, *([1] * d2.dim()))
    if r2 is not None:
        if beyond is None:
            bias = bias.masked_fill((d2 > r2).unsqueeze(0), float("-inf"))
        else:
            bias = torch.where((d2 > r2).unsqueeze(0), beyond.view(-1, *([1] * d2.dim())), bias)
    return bias


@dataclass(frozen=True)
class _Bias:
    """The bias of one kernel call (``_bias`` with its arguments bound)."""

    slopes: Optional[torch.Tensor]
    r2: Optional[int]
    distance: str = "euclidean"
    beyond: Optional[torch.Tensor] = None

    def __call__(self, d2: torch.Tensor, dtype) -> torch.Tensor:
        return _bias(d2, self.slopes, self.r2, dtype, self.distance, self.beyond)


@dataclass(frozen=True)
class _Dropout:
    """Attention dropout (spec §3.5): chunk c's keep mask comes from ``seed + c``, so backward redraws it."""

    p: float
    seed: int

    def scale(self, shape, chunk: int, like: torch.Tensor) -> torch.Tensor:
        """The scaled keep mask of chunk ``chunk``: 1/(1-p) where kept, 0 where dropped."""
        generator = torch.Generator(device=like.device)
        generator.manual_seed(self.seed + chunk)
        keep = torch.rand(shape, generator=generator, device=like.device) >= self.p
        return keep.to(like.dtype).div_(1.0 - self.p)


# --------------------------------------------------------------------------------------------------- oracle
def dense_local_attention_2d(q, k, v, coords, radius: Optional[float], slopes: Slopes = None, mask=None, *,
                             distance: str = "euclidean", beyond=None):
    """The N x N oracle (tests, small N only). ``radius=None`` gives full attention with 2-D ALiBi; ``distance``
    and ``beyond`` as in ``full_attention_2d_alibi``. Shapes as ``local_attention_2d``; padded query rows return 0."""
    coords, mask, slopes = _check(q, k, v, coords, mask, slopes, radius)
    beyond, _ = _check_variant(q.shape[1], q, distance, radius, beyond)
    diff = coords[:, :, None, :] - coords[:, None, :, :]
    d2 = (diff * diff).sum(-1)  # [B, N, N]
    r2 = None if radius is None else int(math.floor(radius * radius))
    bias = _bias(d2, slopes, r2, q.dtype, distance, beyond).transpose(0, 1)  # [B, h|1, N, N]
    if mask is not None:
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if mask is not None:  # padded query rows may be all -inf: make them finite, zero them after the softmax
        s = s.masked_fill(~mask[:, None, :, None], 0.0)
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.masked_fill(~mask[:, None, :, None], 0.0)
    return p @ v


# ------------------------------------------------------------------------------------------------- tiling
@dataclass
class _Plan:
    """Per batch element: chunks of (query rows [Bt, Tq], key rows [Bt, Kc]) into rows padded to N + 2
    (row N: query sentinel, row N + 1: key sentinel) and coords [N + 2, 2] int32 (shifted, with sentinels)."""

    chunks: list
    coords: torch.Tensor
    computed_pairs: int


def _plan(coords_b: torch.Tensor, valid_b: Optional[torch.Tensor], radius: float, tile: int, h: int,
          chunk_elems: int) -> _Plan:
    N = coords_b.shape[0]
    dev = coords_b.device
    idx = torch.arange(N, device=dev) if valid_b is None else torch.nonzero(valid_b).flatten()
    c = coords_b[idx]
    c = c - c.min(0).values if len(idx) else c
    R = int(math.ceil(radius / tile))
    r2 = int(math.floor(radius * radius))
    t = torch.div(c, tile, rounding_mode="floor")  # [n, 2]
    span = int(t[:, 1].max()) + 2 * R + 3 if len(idx) else 1
    tid = (t[:, 0] + R + 1) * span + (t[:, 1] + R + 1)
    q_order = torch.argsort(tid, stable=True)
    uniq, q_counts = torch.unique_consecutive(tid[q_order], return_counts=True)
    # (query tile, key token) pairs within r of the tile's rectangle: N (2R+1)^2 candidates, linear in N
    off = torch.arange(-R, R + 1, device=dev)
    oa, ob = torch.meshgrid(off, off, indexing="ij")
    oa, ob = oa.reshape(-1), ob.reshape(-1)
    tu, tv = t[:, 0:1] + oa, t[:, 1:2] + ob  # [n, (2R+1)^2] target tiles
    dx = torch.clamp(torch.maximum(tu * tile - c[:, 0:1], c[:, 0:1] - (tu * tile + tile - 1)), min=0)
    dy = torch.clamp(torch.maximum(tv * tile - c[:, 1:2], c[:, 1:2] - (tv * tile + tile - 1)), min=0)
    keep = dx * dx + dy * dy <= r2
    ttid = (tu + R + 1) * span + (tv + R + 1)
    pos = torch.searchsorted(uniq, ttid).clamp(max=len(uniq) - 1)
    keep &= uniq[pos] == ttid
    key_tok = torch.arange(len(idx), device=dev)[:, None].expand_as(keep)[keep]
    qt = pos[keep]
    order = torch.argsort(qt, stable=True)
    key_tok, qt = key_tok[order], qt[order]
    k_counts = torch.bincount(qt, minlength=len(uniq))
    k_start = torch.cumsum(k_counts, 0) - k_counts
    q_start = torch.cumsum(q_counts, 0) - q_counts
    q_rows, k_rows = idx[q_order], idx[key_tok]  # original row indices
    # group tiles of similar size; pad each chunk to its maxima
    tile_order = torch.argsort(k_counts * (q_counts.max() + 1) + q_counts).tolist()
    kc_l, qc_l = k_counts.tolist(), q_counts.tolist()
    chunks, cur, mq, mk, computed = [], [], 0, 0, 0

    def flush():
        nonlocal cur, computed
        sel = torch.tensor(cur, device=dev)
        ar_q, ar_k = torch.arange(mq, device=dev), torch.arange(mk, device=dev)
        okq = ar_q < q_counts[sel, None]
        okk = ar_k < k_counts[sel, None]
        qi = torch.where(okq, q_rows[(q_start[sel, None] + ar_q).clamp(max=len(q_rows) - 1)], N)
        ki = torch.where(okk, k_rows[(k_start[sel, None] + ar_k).clamp(max=len(k_rows) - 1)], N + 1)
        chunks.append((qi, ki))
        computed += len(cur) * mq * mk
        cur = []

    for j in tile_order:
        nq, nk = max(mq, qc_l[j]), max(mk, kc_l[j])
        if cur and h * (len(cur) + 1) * nq * nk > chunk_elems:
            flush()
            nq, nk = qc_l[j], kc_l[j]
        cur.append(j)
        mq, mk = nq, nk
    if cur:
        flush()
    far = int(math.ceil(radius)) + 1
    full = torch.zeros(N + 2, 2, dtype=torch.long, device=dev)
    full[idx] = c
    full[N] = -3 * far  # sentinels: farther than r from every real token and from each other
    full[N + 1] = -far
    if int(full.abs().max()) >= 30000:
        raise ValueError("coords span must stay below 30000 grid units (int32 squared distances)")
    return _Plan(chunks, full.to(torch.int32), computed)


def local_attention_pairs(coords: torch.Tensor, radius: float, tile: Optional[int] = None, heads: int = 1,
                          chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> dict:
    """Work of :func:`local_attention_2d` on one bag: ``computed`` (query, key) score entries per head including
    the padding of each chunk, ``useful`` pairs with distance <= r (self included), their ratio and the chunk
    count. ``coords [N, 2]`` integer grid positions. For cost accounting (FLOPs = 14 d x pairs for fwd + bwd)."""
    coords = torch.as_tensor(coords)
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2]; got {tuple(coords.shape)}")
    coords = coords.to(torch.long)
    tile = default_tile(radius) if tile is None else tile
    with torch.no_grad():
        plan = _plan(coords, None, float(radius), tile, heads, chunk_elems)
    r2 = int(math.floor(radius * radius))
    useful = 0
    for qi, ki in plan.chunks:  # count exactly inside the candidate sets (they contain every pair within r)
        cp = plan.coords.to(torch.long)
        diff = cp[qi][:, :, None, :] - cp[ki][:, None, :, :]
        real = (qi < len(coords))[:, :, None] & (ki < len(coords))[:, None, :]
        useful += int(((diff * diff).sum(-1) <= r2)[real].sum())
    return {"computed": plan.computed_pairs, "useful": useful, "computed_over_useful": plan.computed_pairs / useful,
            "chunks": len(plan.chunks), "tile": tile}


def _pad(x: torch.Tensor) -> torch.Tensor:  # [h, N, d] -> [h, N + 2, d]
    return torch.cat([x, x.new_zeros(x.shape[0], 2, x.shape[2])], dim=1)


def _scores(qp, kp, cp, qi, ki, bias: _Bias, scale):
    Q, K = qp[:, qi], kp[:, ki]  # [h, Bt, Tq, d], [h, Bt, Kc, d]
    cq, ck = cp[qi], cp[ki]  # [Bt, Tq, 2], [Bt, Kc, 2] int32
    du = cq[:, :, None, 0] - ck[:, None, :, 0]
    dv = cq[:, :, None, 1] - ck[:, None, :, 1]
    d2 = du.mul_(du).add_(dv.mul_(dv))  # [Bt, Tq, Kc] squared distances, in place
    s = torch.matmul(Q, K.transpose(-1, -2)).mul_(scale)
    if bias.slopes is None:  # mask only: no bias tensor
        return s.masked_fill_((d2 > bias.r2).unsqueeze(0), float("-inf")), Q, K
    s += bias(d2, qp.dtype)
    return s, Q, K


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, bias, dropout):
        B, h, N, d = q.shape
        scale = 1.0 / math.sqrt(d)
        out = q.new_zeros(B, h, N + 2, v.shape[-1])
        lse = q.new_full((B, h, N + 2), float("inf"))
        chunk = 0
        for b, plan in enumerate(plans):
            qp, kp, vp = _pad(q[b]), _pad(k[b]), _pad(v[b])
            for qi, ki in plan.chunks:
                s, _, _ = _scores(qp, kp, plan.coords, qi, ki, bias, scale)
                top = s.amax(dim=-1, keepdim=True)
                pad_rows = torch.isneginf(top)  # padded query rows: every key masked
                top.masked_fill_(pad_rows, 0.0)
                p = s.sub_(top).exp_()  # one pass, in place: P up to the row normaliser
                total = p.sum(dim=-1, keepdim=True)
                if dropout is not None:  # after the normaliser: dropped weights leave the softmax sum as it is
                    p.mul_(dropout.scale(p.shape, chunk, p))
                chunk += 1
                out[b][:, qi] = torch.matmul(p, vp[:, ki]).div_(total.clamp_min_(torch.finfo(s.dtype).tiny))
                m = top.add_(total.log_()).masked_fill_(pad_rows, float("inf")).squeeze(-1)  # lse; +inf: P = 0
                lse[b][:, qi] = m
        out = out[:, :, :N].contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.bias, ctx.dropout = plans, bias, dropout
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        B, h, N, d = q.shape
        scale = 1.0 / math.sqrt(d)
        dq = q.new_zeros(B, h, N + 2, d)
        dk = q.new_zeros(B, h, N + 2, d)
        dv = v.new_zeros(B, h, N + 2, v.shape[-1])
        delta = (grad * out).sum(-1)  # [B, h, N]; with dropout still rowsum(dO * O) for the dropped O
        chunk = 0
        for b, plan in enumerate(ctx.plans):
            qp, kp, vp = _pad(q[b]), _pad(k[b]), _pad(v[b])
            gp = _pad(grad[b].contiguous())
            dp_ = torch.cat([delta[b], delta.new_zeros(h, 2)], dim=1)
            for qi, ki in plan.chunks:
                s, Q, K = _scores(qp, kp, plan.coords, qi, ki, ctx.bias, scale)
                p = s.sub_(lse[b][:, qi].unsqueeze(-1)).exp_()  # in place
                keep = None if ctx.dropout is None else ctx.dropout.scale(p.shape, chunk, p)
                chunk += 1
                dO = gp[:, qi]
                flat_k = ki.reshape(-1)
                p_kept = p if keep is None else p * keep
                dv[b].index_add_(1, flat_k, torch.matmul(p_kept.transpose(-1, -2), dO).reshape(h, -1, dv.shape[-1]))
                dp = torch.matmul(dO, vp[:, ki].transpose(-1, -2))
                ds = (dp if keep is None else dp.mul_(keep)).sub_(dp_[:, qi].unsqueeze(-1)).mul_(p)
                dq[b].index_add_(1, qi.reshape(-1), torch.matmul(ds, K).mul_(scale).reshape(h, -1, d))
                dk[b].index_add_(1, flat_k, torch.matmul(ds.transpose(-1, -2), Q).mul_(scale).reshape(h, -1, d))
        return dq[:, :, :N], dk[:, :, :N], dv[:, :, :N], None, None, None


def local_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor, radius: float,
                       slopes: Slopes = None, mask: Optional[torch.Tensor] = None, *, tile: Optional[int] = None,
                       chunk_elems: int = DEFAULT_CHUNK_ELEMS, distance: str = "euclidean", dropout: float = 0.0,
                       dropout_seed: Optional[int] = None, backend: str = "torch") -> torch.Tensor:
    """Exact 2-D local attention. q, k ``[B, h, N, d]``, v ``[B, h, N, d_v]``, coords ``[B, N, 2]`` integer grid
    positions (any order, holes allowed), radius r >= 0 (keys with distance <= r kept), slopes ``[h]`` or None,
    mask ``[B, N]`` bool (True = real token) or None. ``tile``: tile side in grid units (default
    ``default_tile(r)``); ``chunk_elems``: score entries per chunk (h * tiles * Tq * Kc). Returns ``[B, h, N, d_v]``
    equal to ``dense_local_attention_2d`` (forward and backward) with memory linear in N. ``distance="floor"``:
    bias ``-m_h floor(D)``; ``dropout``, ``dropout_seed``: attention dropout (module docstring; spec §3.3, §3.5).
    Every head is masked beyond r here; soft masks need ``full_attention_2d_alibi(radius=, beyond=)``.
    ``backend``: ``"torch"`` (this tiled kernel) or ``"flex"`` (module docstring; ``tile``, ``chunk_elems`` unused)."""
    coords, mask, slopes = _check(q, k, v, coords, mask, slopes, radius)
    if _check_backend(backend, distance, dropout):
        from milstudy.models.local_attention_flex import flex_attention_2d

        return flex_attention_2d(q, k, v, coords, float(radius), slopes, mask)
    _, dropout = _check_variant(q.shape[1], q, distance, radius, None, dropout, dropout_seed)
    tile = default_tile(radius) if tile is None else tile
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be an int >= 1; got {tile!r}")
    if not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ValueError(f"chunk_elems must be an int >= 1; got {chunk_elems!r}")
    with torch.no_grad():
        plans = [_plan(coords[b], None if mask is None else mask[b], float(radius), tile, q.shape[1], chunk_elems)
                 for b in range(q.shape[0])]
    bias = _Bias(slopes, int(math.floor(radius * radius)), distance)
    return _TiledAttention.apply(q, k, v, plans, bias, dropout)


class _ChunkedFull(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, coords, rows_list, bias, chunk, dropout):
        B, h, N, d = q.shape
        scale = 1.0 / math.sqrt(d)
        out = q.new_zeros(B, h, N, v.shape[-1])
        lse = q.new_zeros(B, h, N)
        index = 0
        for b, rows in enumerate(rows_list):
            kb, vb, cb = k[b][:, rows], v[b][:, rows], coords[b][rows]
            for qr in rows.split(chunk):
                diff = coords[b][qr][:, None, :] - cb[None, :, :]
                s = torch.matmul(q[b][:, qr], kb.transpose(-1, -2)).mul_(scale)
                s += bias((diff * diff).sum(-1), q.dtype)
                m = torch.logsumexp(s, dim=-1)
                p = torch.exp(s - m.unsqueeze(-1))
                if dropout is not None:
                    p.mul_(dropout.scale(p.shape, index, p))
                index += 1
                out[b][:, qr] = torch.matmul(p, vb)
                lse[b][:, qr] = m
        ctx.save_for_backward(q, k, v, out, lse, coords)
        ctx.rows_list, ctx.bias, ctx.chunk, ctx.dropout = rows_list, bias, chunk, dropout
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, coords = ctx.saved_tensors
        d = q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (grad * out).sum(-1)
        index = 0
        for b, rows in enumerate(ctx.rows_list):
            kb, vb, cb = k[b][:, rows], v[b][:, rows], coords[b][rows]
            dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
            for qr in rows.split(ctx.chunk):
                diff = coords[b][qr][:, None, :] - cb[None, :, :]
                Q = q[b][:, qr]
                s = torch.matmul(Q, kb.transpose(-1, -2)).mul_(scale)
                s += ctx.bias((diff * diff).sum(-1), q.dtype)
                p = torch.exp(s - lse[b][:, qr].unsqueeze(-1))
                keep = None if ctx.dropout is None else ctx.dropout.scale(p.shape, index, p)
                index += 1
                dO = grad[b][:, qr]
                dvb += torch.matmul(p.transpose(-1, -2) if keep is None else (p * keep).transpose(-1, -2), dO)
                dp = torch.matmul(dO, vb.transpose(-1, -2))
                ds = p * ((dp if keep is None else dp * keep) - delta[b][:, qr].unsqueeze(-1))
                dq[b][:, qr] = torch.matmul(ds, kb).mul_(scale)
                dkb += torch.matmul(ds.transpose(-1, -2), Q).mul_(scale)
            dk[b][:, rows], dv[b][:, rows] = dkb, dvb
        return dq, dk, dv, None, None, None, None, None


def full_attention_2d_alibi(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor,
                            slopes: Slopes, mask: Optional[torch.Tensor] = None, chunk: int = 256, *,
                            distance: str = "euclidean", radius: Optional[float] = None, beyond=None,
                            dropout: float = 0.0, dropout_seed: Optional[int] = None, backend: str = "torch"
                            ) -> torch.Tensor:
    """Exact full attention with unclipped Euclidean 2-D ALiBi ``-m_h ||p_i - p_j||`` (spec §2.3, global layer),
    computed ``chunk`` query rows at a time: time O(N^2 d), memory O(chunk * N * h). Shapes as
    ``local_attention_2d``; slopes ``[h]`` (None = no bias). Spec §3 variants (module docstring): ``distance``;
    ``radius`` with ``beyond [h]``: the bias where D > r is ``beyond[h]`` (-inf masks the head; ``radius`` alone:
    every head masked, i.e. local attention at O(N^2) time); ``dropout``, ``dropout_seed``; ``backend``: ``"torch"``
    (this kernel) or ``"flex"`` (module docstring; ``chunk`` unused, ``radius`` without ``beyond`` allowed)."""
    coords, mask, slopes = _check(q, k, v, coords, mask, slopes, radius)
    if _check_backend(backend, distance, dropout, beyond):
        from milstudy.models.local_attention_flex import flex_attention_2d

        return flex_attention_2d(q, k, v, coords, None if radius is None else float(radius), slopes, mask)
    beyond, dropout = _check_variant(q.shape[1], q, distance, radius, beyond, dropout, dropout_seed)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    rows_list = [torch.arange(q.shape[2], device=q.device) if mask is None else torch.nonzero(mask[b]).flatten()
                 for b in range(q.shape[0])]
    bias = _Bias(slopes, None if radius is None else int(math.floor(radius * radius)), distance, beyond)
    return _ChunkedFull.apply(q, k, v, coords.to(torch.int32) if coords.abs().max() < 30000 else coords,
                              rows_list, bias, chunk, dropout)
