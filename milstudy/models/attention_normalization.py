"""Alternatives to the softmax for an attention model's own (online) weights (ASMIL spec §4.3 S7, Eq. 34).

Every option is returned as *logits* whose masked softmax is the wanted distribution, so that the model contract
``masked_softmax(out.attention_logits, mask) == out.attention`` (``milstudy.models.base``) stays exact:

- ``"softmax"``: the scores themselves.
- ``"nsf"`` (normalised sigmoid in the online model, Eq. 5 without ε): ``log σ(z)``, since
  ``softmax(log σ(z)) = σ(z) / Σ_j σ(z_j)``.
- ``"mixture"`` (Eq. 34): ``a = α softmax(z) + (1 - α) NSF(z)`` with ``α = σ(ρ)``, ρ a learnt scalar (ρ₀ = 0, the
  spec's choice; the paper's init was stripped), as ``log a`` computed in log space
  (``logaddexp(log α + log softmax z, log(1-α) + log NSF z)``): finite and differentiable however small a weight.
  Since ``a`` sums to 1, ``softmax(log a) = a`` exactly; α = 1 gives the softmax exactly (spec §6 invariant 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.layers import PAD_LOGIT

NORMALIZATIONS = ("softmax", "nsf", "mixture")


def _expand(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``mask [B, N]`` as a bool view broadcastable over ``scores [B, ..., N]``."""
    return mask.to(torch.bool).view(mask.shape[0], *([1] * (scores.dim() - 2)), mask.shape[1])


def _masked_log_softmax(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(scores.masked_fill(~real, float("-inf")), dim=-1).masked_fill(~real, PAD_LOGIT)


def mixture_logits(scores: torch.Tensor, mask: torch.Tensor, log_alpha: torch.Tensor,
                   log_one_minus_alpha: torch.Tensor) -> torch.Tensor:
    """``log(α softmax(z) + (1-α) NSF(z))`` over the real instances of ``scores [B, ..., N]`` (``PAD_LOGIT`` on
    padding); ``log_alpha`` and ``log_one_minus_alpha`` as tensors (``-inf`` allowed: α = 0 or 1)."""
    real = _expand(mask, scores)
    mixed = torch.logaddexp(log_alpha + _masked_log_softmax(scores, real),
                            log_one_minus_alpha + _masked_log_softmax(F.logsigmoid(scores), real))
    return mixed.masked_fill(~real, PAD_LOGIT)


class AttentionNormalization(nn.Module):
    """``forward(scores [B,H,N], mask [B,N]) -> logits [B,H,N]`` whose masked softmax is the chosen normalisation
    (module docstring). ``"mixture"`` holds the learnt ρ (``alpha = σ(ρ)``, exposed as a property)."""

    def __init__(self, kind: str = "softmax", rho_init: float = 0.0) -> None:
        super().__init__()
        if kind not in NORMALIZATIONS:
            raise ValueError(f"attention normalization must be one of {NORMALIZATIONS}, got {kind!r}")
        self.kind = kind
        self.rho = nn.Parameter(torch.tensor(float(rho_init))) if kind == "mixture" else None

    @property
    def alpha(self) -> float | None:
        """The mixture weight of the softmax, σ(ρ) (None for the other kinds)."""
        return None if self.rho is None else float(torch.sigmoid(self.rho.detach()))

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax":
            return scores
        if self.kind == "nsf":
            return F.logsigmoid(scores).masked_fill(~_expand(mask, scores), PAD_LOGIT)
        return mixture_logits(scores, mask, F.logsigmoid(self.rho), F.logsigmoid(-self.rho))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
