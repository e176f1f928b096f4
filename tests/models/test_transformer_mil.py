"""ViTMIL / QAMIL specifics (the zoo-wide invariants are in test_zoo_invariants.py)."""

from __future__ import annotations

import math

import pytest
import torch

from milstudy.models import build_model


def test_vitmil_attention_is_the_cls_row_of_the_last_layer():
    torch.manual_seed(0)
    model = build_model("vitmil", 16, 2, dim=32, heads=4).double().eval()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    out = model(x)
    tokens = torch.cat([model.cls.double(), model.embed(x)], dim=1)
    keys = torch.ones(1, 7, dtype=torch.bool)
    tokens = model.blocks[0](tokens, keys)
    block = model.blocks[1]
    q, k, _ = block.qkv(block.norm1(tokens)).chunk(3, dim=-1)
    q, k = (t.view(1, 7, 4, 8).transpose(1, 2) for t in (q, k))
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # [1, 4, 7, 7], explicit
    expected = full[:, :, 0, 1:] / full[:, :, 0, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(out.attention, expected)


@pytest.mark.parametrize("name", ["vitmil", "qamil"])
def test_width_must_split_into_heads(name):
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model(name, 16, 2, dim=30, heads=4)
