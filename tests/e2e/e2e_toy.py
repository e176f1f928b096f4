"""Shared toy data for the end-to-end tests: hand-built in-memory patch banks with a planted witness signal."""

from __future__ import annotations

import torch
from torch import nn

from milstudy.models.base import MILOutput, _REGISTRY, register_model
from milstudy.data.e2e_slides import toy_slides

TOY_MODEL = "e2e_test_attention_pool"


class _AttentionPool(nn.Module):
    """Minimal attention pooling (for tests that must not depend on the model zoo's progress)."""

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, 1))
        self.head = nn.Linear(in_dim, n_out)

    def forward(self, x, coords=None, mask=None):
        weights = torch.softmax(self.score(x).squeeze(-1), dim=1)  # [B, N]
        return MILOutput(self.head((weights.unsqueeze(-1) * x).sum(1)), weights.unsqueeze(1))


if TOY_MODEL not in _REGISTRY:
    register_model(TOY_MODEL)(lambda in_dim, n_out, **kw: _AttentionPool(in_dim, n_out))


make_toy_slides = toy_slides  # the library's hand-built in-memory cohort (milstudy.data.e2e_slides.toy_slides)
