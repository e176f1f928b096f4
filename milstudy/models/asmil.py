"""ASMIL (Ye et al., "ASMIL: Attention-Stabilized MIL for WSI"; spec asmil.md §2.2, §2.6, §2.9) and the
registered anchor plug-in variants ``<base>_anchor`` / ``<base>_anchor_nsf`` (spec §2.8).

ASMIL network, upstream layout (spec §2.2), ``forward(x [B,N,Df], coords=None, mask=None) -> MILOutput``:
  X' = ReLU(X W_r)                                      [B,N,D]   (bias-free, no norm)
  S_t = (q_t W^Q_t)(X' W^K_t)ᵀ / √d_h                  [B,K,h,N] (each FEAT token t its own block, with biases)
  o_t = LN_1e-6(Drop_0.1(concat_h(softmax_N(S_t) X' W^V_t) W^O_t))   [B,K,D]
  keep: n_drop tokens dropped uniformly (or Bernoulli) in training only (§2.6)   [B,K]
  z = the same block with a zero-init CLS query over {o_t}_kept; ŷ = z W_c + b_c      [B,C]
``attention`` / ``attention_logits`` are ``[B, K·h, N]`` (token-major: index t·h + head), ``extras``:
``token_keep [B,K]``, ``head_keep [B,K·h]`` (for ``kl_tokens="kept"``), ``readout [B,N]`` (mean over heads and
tokens of softmax(S_t), §2.7). ``build_model("asmil")`` is this network inside the one ``AnchoredMIL`` wrapper
(EMA anchor, NSF target, λ=1, β=0.999 per step); ``"asmil_net"`` is the bare network (ASMIL without anchor).
Defaults (§2.9): D=128, h=8, K=8, drop_rate 0.5 (n_drop = round(rK), at least one token kept).
``token_init_std``: the FEAT and CLS tokens' N(0, σ²) init (upstream σ = 1e-6, so the first attention is uniform).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.anchor import ANCHOR_KWARGS, build_anchored, split_anchor_kwargs
from milstudy.models.base import MILModel, MILOutput, build_model, register_model
from milstudy.models.layers import check_bag_input, masked_softmax, pad_attention_logits

DROP_MODES = ("count", "bernoulli")


class TokenCrossAttention(nn.Module):
    """T learnable queries, each with its **own** multi-head cross-attention block over a key set.

    forward(queries [T,D] or [B,T,D], keys [B,M,D], key_mask [B,M]) -> (o [B,T,D], logits [B,T,h,M]).
    o_t = LN(Drop(concat_h(softmax(S_t) V_t) W^O_t)), S_t = (q_t W^Q_t + b)(K W^K_t)ᵀ/√d_h (a key bias would only shift S_t by a
    per-query constant, which the softmax and the NSF-free online path ignore, and would get no gradient).
    """

    def __init__(self, n_queries: int, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TokenCrossAttention: dim={dim} is not divisible by heads={heads}")
        self.heads, self.dim_head = heads, dim // heads
        scale = 1.0 / math.sqrt(dim)
        for name in ("wq", "wk", "wv", "wo"):
            self.register_parameter(name, nn.Parameter(torch.empty(n_queries, dim, dim).uniform_(-scale, scale)))
        for name in ("bq", "bv", "bo"):  # no key bias: it adds a per-query constant to S_t, which softmax ignores
            self.register_parameter(name, nn.Parameter(torch.zeros(n_queries, dim)))
        self.ln_weight = nn.Parameter(torch.ones(n_queries, dim))
        self.ln_bias = nn.Parameter(torch.zeros(n_queries, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor):
        batch, n_keys, dim = keys.shape
        t, h, dh = self.wq.shape[0], self.heads, self.dim_head
        if queries.dim() == 2:
            q = torch.einsum("td,tde->te", queries, self.wq) + self.bq  # [T,D]
            q = q.expand(batch, t, dim)
        else:
            q = torch.einsum("btd,tde->bte", queries, self.wq) + self.bq
        k = torch.einsum("bnd,tde->btne", keys, self.wk)  # [B,T,M,D]
        v = torch.einsum("bnd,tde->btne", keys, self.wv) + self.bv[:, None, :]
        q = q.view(batch, t, h, dh)
        k = k.view(batch, t, n_keys, h, dh)
        v = v.view(batch, t, n_keys, h, dh)
        logits = torch.einsum("bthd,btnhd->bthn", q, k) / math.sqrt(dh)  # [B,T,h,M]
        weights = masked_softmax(logits.reshape(batch, t * h, n_keys), key_mask).view(batch, t, h, n_keys)
        o = torch.einsum("bthn,btnhd->bthd", weights, v).reshape(batch, t, dim)
        o = torch.einsum("btd,tde->bte", o, self.wo) + self.bo
        o = F.layer_norm(self.dropout(o), (dim,), eps=1e-6) * self.ln_weight + self.ln_bias
        return o, logits


class ASMILNet(MILModel):
    """The ASMIL online network (upstream layout, spec §2.2); see the module docstring for shapes."""

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 128,
        heads: int = 8,
        n_tokens: int = 8,
        drop_rate: float = 0.5,
        n_drop: int | None = None,
        drop_mode: str = "count",
        dropout: float = 0.1,
        online_encoder: str = "crossattn",
        token_init_std: float = 1e-6,
    ) -> None:
        super().__init__()
        if online_encoder != "crossattn":
            raise ValueError(
                f"ASMIL: online_encoder={online_encoder!r} is not implemented; only 'crossattn' (upstream layout); "
                "'selfattn' (the literal paper reading, spec §2.2) is future work"
            )
        if drop_mode not in DROP_MODES:
            raise ValueError(f"ASMIL: drop_mode must be one of {DROP_MODES}, got {drop_mode!r}")
        if n_tokens < 1:
            raise ValueError(f"ASMIL: n_tokens must be >= 1, got {n_tokens}")
        if not token_init_std > 0:
            raise ValueError(f"ASMIL: token_init_std must be > 0, got {token_init_std}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"ASMIL: drop_rate must be in [0, 1), got {drop_rate}")
        if n_drop is None:
            n_drop = min(round(drop_rate * n_tokens), n_tokens - 1) if drop_mode == "bernoulli" else round(
                drop_rate * n_tokens)  # bernoulli mode draws its own count; n_drop is only informative there
        if not 0 <= n_drop < n_tokens:
            raise ValueError(f"ASMIL: n_drop must be in [0, n_tokens-1={n_tokens - 1}] (keep >= 1), got {n_drop}")
        self.in_dim, self.heads, self.n_tokens = in_dim, heads, n_tokens
        self.n_drop, self.drop_rate, self.drop_mode = n_drop, drop_rate, drop_mode
        self.reduce = nn.Linear(in_dim, dim, bias=False)
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * token_init_std)
        self.token_blocks = TokenCrossAttention(n_tokens, dim, heads, dropout)
        # spec §2.2 zero-inits the CLS token; with zero bq that gives W^Q/W^K of the aggregator exactly zero gradient
        # at init (the zoo test checks every parameter), so we draw it like the FEAT tokens, N(0, 1e-6²).
        self.cls = nn.Parameter(torch.randn(1, dim) * token_init_std)
        self.aggregator = TokenCrossAttention(1, dim, heads, dropout)
        self.classifier = nn.Linear(dim, n_out)

    def token_keep(self, batch: int, device: torch.device) -> torch.Tensor:
        """Kept FEAT tokens ``[B,K]`` bool: all in eval; in training n_drop dropped (count) or Bernoulli(r),
        redrawn for rows where every token would be dropped."""
        keep = torch.ones(batch, self.n_tokens, dtype=torch.bool, device=device)
        if not self.training:
            return keep
        if self.drop_mode == "count":
            if self.n_drop == 0:
                return keep
            dropped = torch.rand(batch, self.n_tokens, device=device).argsort(-1)[:, : self.n_drop]
            return keep.scatter(1, dropped, False)
        keep = torch.rand(batch, self.n_tokens, device=device) >= self.drop_rate
        while not bool(keep.any(-1).all()):
            empty = ~keep.any(-1)
            keep[empty] = torch.rand(int(empty.sum()), self.n_tokens, device=device) >= self.drop_rate
        return keep

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        mask = check_bag_input(x, self.in_dim, mask, "ASMIL")
        batch, n = x.shape[:2]
        xr = F.relu(self.reduce(x))  # [B,N,D]
        o, s = self.token_blocks(self.tokens, xr, mask)  # [B,K,D], [B,K,h,N]
        keep = self.token_keep(batch, x.device)
        z, _ = self.aggregator(self.cls, o, keep)  # [B,1,D]
        logits = self.classifier(z[:, 0])
        attention_logits = pad_attention_logits(s.reshape(batch, self.n_tokens * self.heads, n), mask)
        attention = masked_softmax(attention_logits, mask)
        head_keep = keep.repeat_interleave(self.heads, dim=1)  # [B,K*h]
        extras = {"token_keep": keep, "head_keep": head_keep, "readout": attention.mean(1), "bag_embedding": z[:, 0]}
        return MILOutput(logits, attention, attention_logits=attention_logits, extras=extras)


@register_model("asmil_net")
def build_asmil_net(in_dim: int, n_out: int, **kwargs) -> ASMILNet:
    """The bare ASMIL network (no anchor; 'ASMIL without anchor' in S1/S5)."""
    return ASMILNet(in_dim, n_out, **kwargs)


@register_model("asmil")
def build_asmil(in_dim: int, n_out: int, **kwargs):
    """ASMIL: the network in ``AnchoredMIL`` (EMA anchor, NSF target). Anchor options: ``ANCHOR_KWARGS``."""
    base, anchor = split_anchor_kwargs(kwargs)
    anchor.setdefault("anchor_target", "nsf")
    return build_anchored(lambda: ASMILNet(in_dim, n_out, **base), **anchor)


# DSMIL: its attention logits are scaled inner products of tanh queries, near 0 at init, so its NSF anchor target is
# near-uniform and at λ = 1 the anchor acts as a uniform target on its bag stream (tests/models: 0.85-0.90 on the
# zoo's toy problem against 0.99 bare, 0.95-0.98 at λ = 0.1); the paper reports F1 drops for DSMIL + anchor.
ANCHOR_BASES = ("abmil", "abmil_gated", "clam_sb", "transmil", "abmilx", "dsmil")


def _register_plugin(base_name: str, target: str, suffix: str) -> None:
    def builder(in_dim: int, n_out: int, **kwargs):
        base, anchor = split_anchor_kwargs(kwargs)
        anchor.setdefault("anchor_target", target)
        return build_anchored(lambda: build_model(base_name, in_dim, n_out, **base), **anchor)

    builder.__doc__ = (
        f"{base_name} + anchor ({target} target, spec §2.8); kwargs in {ANCHOR_KWARGS} go to AnchoredMIL, "
        f"the rest to {base_name}."
    )
    register_model(f"{base_name}{suffix}")(builder)


for _base in ANCHOR_BASES:
    _register_plugin(_base, "softmax", "_anchor")
    _register_plugin(_base, "nsf", "_anchor_nsf")
