"""ABMILX: multi-head local attention + "attention plus" (Tang, Qin et al. 2025, arXiv 2506.02408, Eqs. 3-4).

Implements shared/specs/abmilx.md §2.4 exactly (upstream DAttentionX layout, our own code):

    H   = Drop_0.25(GELU(LN_nobias(X) W_in))                        [B,N,D]     (§2.4.1)
    H^j = H[:, (j-1)d : jd]                                         [B,m,N,d]   (§2.4.2, contiguous split)
    A^j = GELU(H^j W_1) w_2                                         [B,m,N]     (§2.4.3, MLP shared by heads)
    U^j = softmax(LN_d(H^j) W^q (LN_d(H^j) W^k)ᵀ / √d)              [N,N] never materialised
    G(A^j) = A^j + α U^j A^j                                        [B,m,N]     (Eq. 4, "A+")
    w^j = softmax_N(G(A^j)),  Z^j = w^jᵀ H^j                        [B,m,d]     (Eq. 3)
    Z = [Z^1..Z^m] W_proj (+ FFN(Z))                                [B,D]
    logits = LN_nobias(Z) W_cls                                     [B,C]

``U A`` is computed by ``layers.softmax_attention_times_vector`` (chunked exact autograd on CPU, fused SDPA on
CUDA): memory O(N), never an N x N matrix. Options: ``attn_plus=False`` gives MHLA; ``alpha_init`` "randn"
(α₀ ~ N(0,1) from the torch RNG, as upstream's Xavier-normal 1x1 Linear) or a float; ``alpha_fixed`` (True: keep
α at its init; a float: α fixed at that value); ``attention_bias=True`` (upstream survival config);
``ffn=True`` (Table 7a); ``paper_minimal=True`` removes the upstream-only A+ LN, W_proj and final LN.
Parameter check (spec §6.15): D_in=1024, D=512, m=8, C=2, no FFN -> 801,473 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model, register_preset
from milstudy.models.layers import (
    check_bag_input,
    masked_softmax,
    pad_attention_logits,
    softmax_attention_times_vector,
)


class ABMILX(MILModel):
    """ABMILX aggregator; ``forward(x [B,N,D_in], coords=None, mask=None) -> MILOutput``.

    ``attention`` is ``[B, m, N]`` (one distribution per head, not averaged); ``attention_logits`` is what its
    softmax normalises, G(A) = A + αUA ``[B,m,N]`` (Eq. 4, A+ included; ``PAD_LOGIT`` on padding). ``extras``:
    ``local_logits`` A ``[B,m,N]``, ``attn_plus_delta`` αUA ``[B,m,N]`` (zeros with A+ off), ``alpha``
    (scalar), ``head_embeddings`` Z before W_proj ``[B,m,d]``, ``bag_embedding`` ``[B,D]``. Local logits and
    deltas are 0 on padded positions.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 512,
        heads: int = 8,
        dropout: float = 0.25,
        attn_plus: bool = True,
        alpha_init: str | float = "randn",
        alpha_fixed: bool | float = False,
        attention_bias: bool = False,
        ffn: bool = False,
        paper_minimal: bool = False,
        attention_backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"ABMILX: heads={heads} must divide dim={dim} (each head takes dim/heads channels)")
        self.in_dim, self.dim, self.heads, self.head_dim = in_dim, dim, heads, dim // heads
        self.attn_plus, self.attention_backend = attn_plus, attention_backend
        self.embed = nn.Sequential(
            nn.LayerNorm(in_dim, bias=False), nn.Linear(in_dim, dim, bias=False), nn.GELU(), nn.Dropout(dropout)
        )
        self.local_attention = nn.Sequential(  # shared by every head (§2.4.3)
            nn.Linear(self.head_dim, self.head_dim, bias=attention_bias),
            nn.GELU(),
            nn.Linear(self.head_dim, 1, bias=attention_bias),
        )
        if attn_plus:
            self.plus_norm = nn.Identity() if paper_minimal else nn.LayerNorm(self.head_dim)
            self.query = nn.Linear(self.head_dim, self.head_dim, bias=False)
            self.key = nn.Linear(self.head_dim, self.head_dim, bias=False)
            if alpha_fixed is not False and not isinstance(alpha_fixed, bool):
                self.register_buffer("alpha", torch.tensor(float(alpha_fixed)))
            else:
                alpha0 = torch.randn(()) if alpha_init == "randn" else torch.tensor(float(alpha_init))
                if alpha_fixed is True:
                    self.register_buffer("alpha", alpha0)
                else:
                    self.alpha = nn.Parameter(alpha0)
        self.proj = nn.Identity() if paper_minimal else nn.Linear(dim, dim, bias=False)
        self.ffn = (
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) if ffn else None
        )
        self.out_norm = nn.Identity() if paper_minimal else nn.LayerNorm(dim, bias=False)
        self.classifier = nn.Linear(dim, n_out, bias=False)
        for module in self.modules():  # §2.4.7: Xavier-normal Linears, zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def split_heads(self, h: torch.Tensor) -> torch.Tensor:
        """``H [B,N,D]`` -> ``[B,m,N,d]`` (contiguous channel blocks)."""
        batch, n_instances, _ = h.shape
        return h.view(batch, n_instances, self.heads, self.head_dim).transpose(1, 2)

    def queries_keys(self, hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,m,N,d]`` -> Q, K ``[B,m,N,d]`` of A+ (W^q, W^k shared by heads)."""
        normed = self.plus_norm(hh)
        return self.query(normed), self.key(normed)

    def attention_plus(self, hh: torch.Tensor, local: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The A+ term α U A ``[B,m,N]`` for local logits ``local [B,m,N]``, O(N) memory."""
        q, k = self.queries_keys(hh)
        return self.alpha * softmax_attention_times_vector(q, k, local, mask, backend=self.attention_backend)

    def attention_plus_matrix(self, hh: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Explicit U ``[B,m,N,N]`` (row-stochastic over real keys), for analyses with small N only."""
        if hh.shape[2] > 4096:
            raise ValueError(f"attention_plus_matrix materialises N x N; N={hh.shape[2]} > 4096 is refused")
        q, k = self.queries_keys(hh)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        return torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)

    def aggregate(self, weights: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        """Eq. 3 per head: w ``[B,m,N]``, H ``[B,m,N,d]`` -> Z ``[B,m,d]``."""
        return torch.einsum("bmn,bmnd->bmd", weights, hh)

    def classify(self, head_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z ``[B,m,d]`` -> (logits ``[B,C]``, bag embedding after W_proj/FFN ``[B,D]``)."""
        z = self.proj(head_embeddings.flatten(1))  # [B,D]
        if self.ffn is not None:
            z = z + self.ffn(z)
        return self.classifier(self.out_norm(z)), z

    def forward_embeddings(self, h: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        """Everything after the input embedding: H ``[B,N,D]``, mask ``[B,N]`` -> MILOutput."""
        hh = self.split_heads(h)  # [B,m,N,d]
        local = self.local_attention(hh).squeeze(-1)  # A: [B,m,N]
        local = local.masked_fill(~mask[:, None, :], 0.0)
        if self.attn_plus:
            delta = self.attention_plus(hh, local, mask).masked_fill(~mask[:, None, :], 0.0)  # αUA
            alpha = self.alpha.detach()
        else:
            delta, alpha = torch.zeros_like(local), torch.zeros(())
        attention_logits = pad_attention_logits(local + delta, mask)  # G(A), Eq. 4
        weights = masked_softmax(attention_logits, mask)  # w: [B,m,N]
        head_embeddings = self.aggregate(weights, hh)  # Z^j: [B,m,d]
        logits, bag = self.classify(head_embeddings)
        extras = {
            "local_logits": local,
            "attn_plus_delta": delta,
            "alpha": alpha,
            "head_embeddings": head_embeddings,
            "bag_embedding": bag,
        }
        return MILOutput(logits=logits, attention=weights, attention_logits=attention_logits, extras=extras)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D_in]`` -> MILOutput (coords are unused: ABMILX has no positions)."""
        mask = check_bag_input(x, self.in_dim, mask, "ABMILX")
        return self.forward_embeddings(self.embed(x), mask)


@register_model("abmilx")
def build_abmilx(in_dim: int, n_out: int, **kwargs) -> ABMILX:
    """ABMILX with the Table 1 defaults (D=512, m=8, learnable α, no FFN)."""
    return ABMILX(in_dim, n_out, **kwargs)


# spec §5.3 (paper App. B.3 + upstream configs) and the §2.4 ablation reductions
register_preset("abmilx_paper_panda", "abmilx", dim=512, heads=4, ffn=True)
register_preset("abmilx_paper_brca_sub", "abmilx", dim=256, heads=8)
register_preset("abmilx_paper_brca_surv", "abmilx", dim=256, heads=8, attention_bias=True)
register_preset("abmilx_cpu", "abmilx", dim=64, heads=4)
register_preset("mhla", "abmilx", attn_plus=False)
register_preset("abmilx_alpha1", "abmilx", alpha_fixed=1.0)
