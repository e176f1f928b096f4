"""Small building blocks shared by the model zoo.

- ``check_bag_input``: the one place that validates ``x`` / ``mask`` (feature width, empty bags).
- ``masked_softmax``: softmax over instances that is exactly zero on padded positions; ``PAD_LOGIT`` and
  ``pad_attention_logits``: what ``MILOutput.attention_logits`` holds on padding.
- ``softmax_attention_times_vector``: ``softmax(Q Kᵀ/√d) a`` for a value of width 1 (the "attention plus" term of
  ABMILX, Tang et al. 2025 Eq. 4) through torch's fused SDPA kernels, or an exact query-chunked autograd
  fallback; neither the forward nor the backward ever holds the N x N matrix (memory O(N), time O(N²d)).
- ``NystromAttention``: the Nyström self-attention of Xiong et al. 2021 (Eqs. 13-15, Moore-Penrose
  pseudo-inverse by the iteration of Razavi et al. 2014) as used by TransMIL (Shao et al. 2021), O(N·landmarks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def check_bag_input(
    x: torch.Tensor, in_dim: int, mask: torch.Tensor | None, model_name: str
) -> torch.Tensor:
    """Validate a bag batch and return a boolean mask ``[B, N]`` (True = real instance).

    Raises ``ValueError`` naming expected vs got for a wrong feature width, a wrong rank, an empty bag (N = 0)
    or a bag whose mask has no real instance. Cheap: shape checks plus one ``any`` over the mask.
    """
    if x.dim() != 3:
        raise ValueError(f"{model_name}: expected features of shape [B, N, D], got shape {tuple(x.shape)}")
    batch, n_instances, width = x.shape
    if width != in_dim:
        raise ValueError(
            f"{model_name}: feature dimension mismatch: the model expects D={in_dim} per instance, "
            f"got D={width}; build the model with in_dim={width} or use features from the matching encoder"
        )
    if n_instances == 0:
        raise ValueError(f"{model_name}: empty bag (N=0 instances); skip empty slides before the model")
    if mask is None:
        return torch.ones(batch, n_instances, dtype=torch.bool, device=x.device)
    if mask.shape != (batch, n_instances):
        raise ValueError(f"{model_name}: mask must have shape {(batch, n_instances)}, got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"{model_name}: bag(s) at batch index {rows} have no real instance (mask all False)")
    return mask


PAD_LOGIT = -1e4
"""The value ``MILOutput.attention_logits`` holds on padded positions: finite (so ``0 * logit``, differences of
two models' logits and ``log_softmax`` stay finite) and low enough that ``exp(PAD_LOGIT - max)`` underflows to
exactly 0 in float32 and float64 for any real logit above -9000."""


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``logits [B, ..., N]`` over instances, exactly 0 where ``mask [B, N]`` is False.

    Whatever padded positions hold (``PAD_LOGIT``, -inf, garbage) is ignored: they are replaced by -inf before the
    softmax and their weight set to 0 after, so ``masked_softmax(out.attention_logits, mask) == out.attention``.
    """
    if mask.dim() != 2 or mask.shape[0] != logits.shape[0] or mask.shape[1] != logits.shape[-1]:
        raise ValueError(
            f"masked_softmax: mask must be [B, N] = {(logits.shape[0], logits.shape[-1])} for logits of shape "
            f"{tuple(logits.shape)}, got mask of shape {tuple(mask.shape)}"
        )
    expanded = mask.to(torch.bool).view(mask.shape[0], *([1] * (logits.dim() - 2)), mask.shape[1])
    weights = torch.softmax(logits.masked_fill(~expanded, float("-inf")), dim=dim)
    return weights.masked_fill(~expanded, 0.0)


def pad_attention_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logits [B, heads, N]`` with ``PAD_LOGIT`` where ``mask [B, N]`` is False (the form of
    ``MILOutput.attention_logits``); gradient flows to the real positions unchanged."""
    return logits.masked_fill(~mask[:, None, :], PAD_LOGIT)


def _chunk_size(rows_per_query: int, n_keys: int, budget: int) -> int:
    return max(1, budget // max(1, rows_per_query * n_keys))


class _SoftmaxTimesVector(torch.autograd.Function):
    """``out = softmax(Q Kᵀ · scale + bias) a`` per head, chunked over queries, with a recomputing backward.

    Shapes: q, k ``[B, h, N, d]``, a ``[B, h, N]``, key_bias ``[B, 1, 1, N]`` (0 or -inf), out ``[B, h, N]``.
    Backward, with P the softmax rows of a query chunk and g the upstream gradient of that chunk:
    dS = P ⊙ g (aᵀ - out) (softmax Jacobian with a rank-1 value), dQ = dS K · scale, dK = dSᵀ Q · scale, da = Pᵀ g.
    """

    @staticmethod
    def forward(ctx, q, k, a, key_bias, scale: float, budget: int):  # noqa: D102
        batch, heads, n_query, _ = q.shape
        chunk = _chunk_size(batch * heads, k.shape[2], budget)
        out = torch.empty(batch, heads, n_query, dtype=q.dtype, device=q.device)
        for start in range(0, n_query, chunk):
            stop = min(start + chunk, n_query)
            probs = torch.softmax(q[:, :, start:stop] @ k.transpose(-1, -2) * scale + key_bias, dim=-1)
            out[:, :, start:stop] = (probs @ a.unsqueeze(-1)).squeeze(-1)  # [B,h,c]
        ctx.save_for_backward(q, k, a, key_bias, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, a, key_bias, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_a = torch.zeros_like(a)
        for start in range(0, q.shape[2], chunk):
            stop = min(start + chunk, q.shape[2])
            q_chunk = q[:, :, start:stop]  # [B,h,c,d]
            probs = torch.softmax(q_chunk @ k.transpose(-1, -2) * scale + key_bias, dim=-1)  # [B,h,c,N]
            g = grad_out[:, :, start:stop].unsqueeze(-1)  # [B,h,c,1]
            grad_a += (probs * g).sum(dim=2)  # Pᵀ g: [B,h,N]
            d_scores = probs * g * (a.unsqueeze(-2) - out[:, :, start:stop].unsqueeze(-1))  # [B,h,c,N]
            grad_q[:, :, start:stop] = (d_scores @ k) * scale
            grad_k += (d_scores.transpose(-1, -2) @ q_chunk) * scale
        return grad_q, grad_k, grad_a, None, None, None


def softmax_attention_times_vector(
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    budget: int = 1 << 24,
) -> torch.Tensor:
    """``U a`` with ``U = softmax(Q Kᵀ / √d)`` (rows over keys), never materialising U (N x N).

    q, k: ``[B, h, N, d]``; a: ``[B, h, N]``; mask: ``[B, N]`` (False keys are excluded) -> ``[B, h, N]``.
    backend ``"sdpa"`` (= ``"auto"``): ``F.scaled_dot_product_attention`` restricted to the fused flash /
    memory-efficient kernels (never the math kernel, which builds N x N), with the value column zero-padded to
    width d because torch's CPU flash kernel requires equal q/v widths (it refuses a width-1 value); if no fused
    kernel accepts the inputs it falls back to ``"chunked"``: a hand-written exact autograd that loops over
    query chunks (``budget`` bounds one chunk's score block), slower but also O(N) memory.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        backend = "sdpa"
    if backend == "sdpa":
        value = F.pad(a.unsqueeze(-1), (0, q.shape[-1] - 1))  # [B,h,N,d]; zero columns keep column 0 exact
        attn_mask = None if mask is None else mask[:, None, None, :]
        try:
            with sdpa_kernel(_FUSED_BACKENDS):
                return F.scaled_dot_product_attention(q, k, value, attn_mask=attn_mask)[..., 0]
        except RuntimeError:
            backend = "chunked"
    if backend != "chunked":
        raise ValueError(f"unknown attention backend {backend!r}; use 'auto', 'chunked' or 'sdpa'")
    if mask is None:
        key_bias = torch.zeros(q.shape[0], 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
    else:
        key_bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        key_bias = key_bias[:, None, None, :]
    return _SoftmaxTimesVector.apply(q, k, a, key_bias, scale, budget)


def moore_penrose_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Iterative pseudo-inverse of ``x [..., m, m]`` (Razavi et al. 2014), as in Nyströmformer Eq. 16."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (col.amax() * row.amax())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def nystrom_factors(q: torch.Tensor, k: torch.Tensor, landmarks: int, pinv_iterations: int = 6
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three Nyström factors (Nyströmformer Eq. 14) of already scaled ``q, k [..., L, d]`` with L a multiple
    of ``landmarks``: ``softmax(Q K̃ᵀ) [..., L, m]``, ``pinv(softmax(Q̃ K̃ᵀ)) [..., m, m]``,
    ``softmax(Q̃ Kᵀ) [..., m, L]``, landmarks the means of m contiguous segments; their product approximates
    softmax(QKᵀ)."""
    length, dim = q.shape[-2], q.shape[-1]
    if length % landmarks:
        raise ValueError(f"nystrom_factors: the sequence length {length} must be a multiple of landmarks={landmarks}")
    seg = length // landmarks
    q_land = q.reshape(*q.shape[:-2], landmarks, seg, dim).mean(dim=-2)  # [..., m, d]
    k_land = k.reshape(*k.shape[:-2], landmarks, seg, dim).mean(dim=-2)
    kernel_1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
    kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
    kernel_3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)
    return kernel_1, moore_penrose_pinv(kernel_2, pinv_iterations), kernel_3


class NystromAttention(nn.Module):
    """Nyström multi-head self-attention (Xiong et al. 2021), the attention layer of TransMIL.

    softmax(QKᵀ/√d) V ≈ softmax(Q K̃ᵀ) pinv(softmax(Q̃ K̃ᵀ)) softmax(Q̃ Kᵀ) V  (Nyströmformer Eq. 14), with landmarks
    Q̃, K̃ the means of ``landmarks`` contiguous segments (the sequence is zero-padded at the front to a multiple
    of ``landmarks``), plus a depthwise convolution of V along the sequence (kernel 33) as residual.
    Time and memory O(N · landmarks). Input/Output ``[B, N, dim]``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head or dim // heads
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        inner = heads * self.dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, dim]`` -> q (already scaled by 1/√d), k, v, each ``[B, heads, N, dim_head]``."""
        batch, n_tokens, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(batch, n_tokens, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        return q * self.dim_head**-0.5, k, v

    def forward(
        self, x: torch.Tensor, return_first_row_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, N, dim]`` -> ``[B, N, dim]``; with ``return_first_row_logits`` also the EXACT attention logits of
        token 0 over all N tokens, q_0·k_t/√d ``[B, heads, N]`` (not the Nyström approximation), from the q/k this
        forward computes anyway: O(N·d) extra work, with gradient (the front zero padding is not among the keys)."""
        batch, n_tokens, _ = x.shape
        n_land = self.landmarks
        pad = (-n_tokens) % n_land
        x_padded = F.pad(x, (0, 0, pad, 0))  # zero tokens at the front: [B, N+pad, dim]
        q, k, v = self.split_heads(x_padded)  # [B,h,L,dh]
        kernel_1, pinv_2, kernel_3 = nystrom_factors(q, k, n_land, self.pinv_iterations)
        out = kernel_1 @ (pinv_2 @ (kernel_3 @ v))  # [B,h,L,dh]
        out = out + self.residual_conv(v)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * self.dim_head)[:, pad:]  # [B,N,inner]
        out = self.to_out(out)
        if not return_first_row_logits:
            return out
        return out, torch.einsum("bhd,bhnd->bhn", q[:, :, pad], k[:, :, pad:])  # q already scaled: [B,h,N]
