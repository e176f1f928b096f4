"""Attention-based MIL pooling (Ilse, Tomczak & Welling 2018, ICML, arXiv 1802.04712), plain and gated.

    h_k = act(W_e x_k)                                            [B,N,L]   instance embedding (their "fc 500")
    a_k = softmax_k( wᵀ tanh(V h_kᵀ) )                            [B,1,N]   Eq. 8 (plain)
    a_k = softmax_k( wᵀ (tanh(V h_kᵀ) ⊙ sigm(U h_kᵀ)) )           [B,1,N]   Eq. 9 (gated)
    z   = Σ_k a_k h_k                                             [B,L]     Eq. 7
    logits = W_c z                                                [B,C]

Defaults follow the paper (L=500, attention width K=128, ReLU, no dropout). The ``abmil_upstream`` preset is the
ABMIL baseline of the ABMILX code (shared/specs/abmilx.md §2.5, issue 9): LN at the input, Linear(D_in, L) -> GELU
-> dropout 0.25, attention Linear(L,128) -> tanh -> Linear(128,1), weighted sum -> LN -> Linear, with no bias in
any Linear or LayerNorm (``bias=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from milstudy.models.attention_normalization import AttentionNormalization
from milstudy.models.base import MILModel, MILOutput, register_model, register_preset
from milstudy.models.layers import check_bag_input, masked_softmax, pad_attention_logits

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class AttentionScorer(nn.Module):
    """Ilse et al. Eq. 8 (plain) or Eq. 9 (gated) scores: ``[B,N,L] -> [B,N]`` pre-softmax logits; ``n_scores``
    branches share the tanh / gate layers (``[B,N,n_scores]``)."""

    def __init__(self, dim: int, attention_dim: int = 128, gated: bool = False, dropout: float = 0.0,
                 bias: bool = True, n_scores: int = 1) -> None:
        super().__init__()
        self.n_scores = n_scores
        self.tanh_branch = nn.Sequential(nn.Linear(dim, attention_dim, bias=bias), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = (
            nn.Sequential(nn.Linear(dim, attention_dim, bias=bias), nn.Sigmoid(), nn.Dropout(dropout)) if gated
            else None
        )
        self.score = nn.Linear(attention_dim, n_scores, bias=False)  # Eq. 8 has no bias (softmax would ignore it)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h ``[B,N,L]`` -> logits ``[B,N]`` (``[B,N,n_scores]`` for several attention branches, e.g. ACMIL)."""
        hidden = self.tanh_branch(h)  # [B,N,K]
        if self.gate_branch is not None:
            hidden = hidden * self.gate_branch(h)  # Eq. 9 gating
        scores = self.score(hidden)
        return scores.squeeze(-1) if self.n_scores == 1 else scores


class ABMIL(MILModel):
    """ABMIL; ``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` with attention ``[B,1,N]``.

    ``attention_logits`` ``[B,1,N]``: the scores of Eq. 8 / 9 before the softmax (``PAD_LOGIT`` on padding).
    ``bias=False``: no bias in any Linear or LayerNorm (the upstream layout).
    ``attention_normalization``: ``"softmax"`` (the paper), or ASMIL's S7 alternatives ``"nsf"`` / ``"mixture"``
    (``milstudy.models.attention_normalization``; the logits are then the transformed scores, and
    ``extras["attention_scores"]`` the scorer's own output). extras: ``bag_embedding`` ``[B,L]``.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 500,
        attention_dim: int = 128,
        gated: bool = False,
        activation: str = "relu",
        dropout: float = 0.0,
        input_norm: bool = False,
        output_norm: bool = False,
        attention_normalization: str = "softmax",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ABMIL: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.in_dim = in_dim
        self.embed = nn.Sequential(
            nn.LayerNorm(in_dim, bias=bias) if input_norm else nn.Identity(),
            nn.Linear(in_dim, hidden_dim, bias=bias),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
        )
        self.scorer = AttentionScorer(hidden_dim, attention_dim, gated=gated, bias=bias)
        self.normalization = AttentionNormalization(attention_normalization)
        self.out_norm = nn.LayerNorm(hidden_dim, bias=bias) if output_norm else nn.Identity()
        self.classifier = nn.Linear(hidden_dim, n_out, bias=bias)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D]`` -> MILOutput (coords unused)."""
        mask = check_bag_input(x, self.in_dim, mask, "ABMIL")
        h = self.embed(x)  # [B,N,L]
        raw = pad_attention_logits(self.scorer(h).unsqueeze(1), mask)  # [B,1,N]
        scores = self.normalization(raw, mask)  # the raw scores themselves for the softmax (the paper)
        weights = masked_softmax(scores, mask)  # [B,1,N]
        bag = torch.einsum("bhn,bnl->bl", weights, h)  # Eq. 7: [B,L]
        logits = self.classifier(self.out_norm(bag))
        extras = {"bag_embedding": bag}
        if scores is not raw:  # the scorer's own output, for an anchor target that normalises the scores itself
            extras["attention_scores"] = raw
        return MILOutput(logits, weights, attention_logits=scores, extras=extras)


@register_model("abmil")
def build_abmil(in_dim: int, n_out: int, **kwargs) -> ABMIL:
    """Ilse et al. 2018 ABMIL (plain attention, Eq. 8)."""
    return ABMIL(in_dim, n_out, **kwargs)


register_preset("abmil_gated", "abmil", gated=True)  # Eq. 9
register_preset(
    "abmil_upstream", "abmil", hidden_dim=512, input_norm=True, dropout=0.25, output_norm=True, activation="gelu",
    bias=False,
)  # ABMILX code's ABMIL baseline (spec §2.5; issue 9: LN, GELU, dropout 0.25, no biases, LN before the classifier)
