"""ACMIL: attention-challenging MIL (Zhang et al., ECCV 2024), a baseline of the ASMIL paper (specs/asmil.md §4;
the ASMIL code descends from ACMIL's). Built on our gated ABMIL scorer:

    h_i = ReLU(W x_i)                                       [B,N,L]   dimension reduction (no bias)
    s_ki = w_kᵀ (tanh(V h_i) ⊙ sigm(U h_i))                  [B,K,N]   multiple-branch attention (MBA), K branches
    STKIM (training only): per branch, ``floor(m * p)`` of its ``m = min(n_masked, N)`` top-scored instances,
        drawn at random, get the score PAD_LOGIT (weight 0): the model cannot rely on a few instances alone
    a_k = softmax_i(s_k),  z_k = Σ_i a_ki h_i,  y_k = W_k z_k   branch predictions (each trained with the task loss)
    ā = mean_k a_k,  z = Σ_i ā_i h_i,  logits = W_c z       the slide prediction

Loss (``combined_loss``): task(logits) + (1/K) Σ_k task(y_k) (``loss_streams``) + λ_div · mean over branch pairs
of the cosine similarity of their attention maps (``aux_losses["diversity"]``), as the authors' training script
adds them (weight 1 each). Defaults: the authors' K = 5 branches, 10 top instances, drop rate 0.6, L = 512,
attention width 128. ``attention`` / ``attention_logits``: the K branch maps ``[B,K,N]`` (analyses take the head
mean, which is ā); in training they include the STKIM-dropped instances at PAD_LOGIT, so
``masked_softmax(attention_logits, mask) == attention`` holds there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.abmil import AttentionScorer
from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import PAD_LOGIT, check_bag_input, masked_softmax, pad_attention_logits


def stochastic_topk_mask(scores: torch.Tensor, mask: torch.Tensor, n_masked: int, drop: float) -> torch.Tensor:
    """STKIM: bool ``[B,K,N]``, True where an instance is dropped: per bag and branch, ``floor(m * drop)`` of the
    ``m = min(n_masked, n_real)`` highest-scored real instances, chosen uniformly (torch's global RNG)."""
    n_real = mask.sum(1)  # [B]
    m = torch.clamp(n_real, max=n_masked)
    n_drop = torch.floor(m * drop).long()  # [B]
    if int(n_drop.max()) == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    real = mask[:, None, :].expand_as(scores)
    rank = torch.argsort(torch.argsort(scores.masked_fill(~real, float("-inf")), dim=-1, descending=True), dim=-1)
    candidate = real & (rank < m[:, None, None])
    draw = torch.rand(scores.shape, device=scores.device).masked_fill(~candidate, float("inf"))
    draw_rank = torch.argsort(torch.argsort(draw, dim=-1), dim=-1)
    return candidate & (draw_rank < n_drop[:, None, None])


def branch_diversity(attention: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over pairs of branch attention maps ``[B,K,N]`` (0 for one branch), averaged over B."""
    k = attention.shape[1]
    if k < 2:
        return attention.sum() * 0.0
    unit = F.normalize(attention, dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [B,K,K]
    pairs = torch.triu_indices(k, k, offset=1, device=attention.device)
    return similarity[:, pairs[0], pairs[1]].mean()


class ACMIL(MILModel):
    """``forward(x [B,N,D], coords=None, mask=None) -> MILOutput`` (module docstring)."""

    def __init__(self, in_dim: int, n_out: int, hidden_dim: int = 512, attention_dim: int = 128,
                 n_branches: int = 5, n_masked: int = 10, mask_drop: float = 0.6,
                 diversity_weight: float = 1.0) -> None:
        super().__init__()
        if n_branches < 1 or n_masked < 0 or not 0.0 <= mask_drop <= 1.0 or diversity_weight < 0:
            raise ValueError(f"ACMIL: need n_branches >= 1, n_masked >= 0, mask_drop in [0, 1] and "
                             f"diversity_weight >= 0; got {n_branches}, {n_masked}, {mask_drop}, {diversity_weight}")
        self.in_dim, self.n_masked, self.mask_drop = in_dim, n_masked, mask_drop
        self.diversity_weight = diversity_weight
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.scorer = AttentionScorer(hidden_dim, attention_dim, gated=True, n_scores=n_branches)
        self.branch_heads = nn.ModuleList(nn.Linear(hidden_dim, n_out) for _ in range(n_branches))
        self.classifier = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> MILOutput:
        mask = check_bag_input(x, self.in_dim, mask, "ACMIL")
        h = self.embed(x)  # [B,N,L]
        scores = pad_attention_logits(self.scorer(h).view(*h.shape[:2], -1).transpose(1, 2), mask)  # [B,K,N]
        if self.training and self.n_masked and self.mask_drop:
            scores = scores.masked_fill(stochastic_topk_mask(scores, mask, self.n_masked, self.mask_drop), PAD_LOGIT)
        weights = masked_softmax(scores, mask)  # [B,K,N]
        branch_bags = weights @ h  # [B,K,L]
        k = len(self.branch_heads)
        streams = {f"branch_{i}": (head(branch_bags[:, i]), 1.0 / k) for i, head in enumerate(self.branch_heads)}
        bag = torch.einsum("bn,bnl->bl", weights.mean(1), h)
        aux = {"diversity": self.diversity_weight * branch_diversity(weights)} if k > 1 and self.diversity_weight \
            else {}
        return MILOutput(self.classifier(bag), weights, attention_logits=scores, aux_losses=aux,
                         loss_streams=streams, extras={"bag_embedding": bag})


@register_model("acmil")
def build_acmil(in_dim: int, n_out: int, **kwargs) -> ACMIL:
    """ACMIL with the authors' defaults (K = 5 branches, STKIM on the top 10 at drop rate 0.6)."""
    return ACMIL(in_dim, n_out, **kwargs)
