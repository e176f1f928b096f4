"""TransMIL (Shao et al. 2021) and the Nyström attention layer (Xiong et al. 2021)."""

from __future__ import annotations

import math

import torch

from milstudy.models import build_model
from milstudy.models.layers import NystromAttention, moore_penrose_pinv


def test_pinv_iteration_inverts_a_softmax_kernel():
    torch.manual_seed(0)
    kernel = torch.softmax(torch.randn(2, 6, 6, dtype=torch.float64), -1)
    torch.testing.assert_close(moore_penrose_pinv(kernel, 40), torch.linalg.inv(kernel), atol=1e-8, rtol=1e-8)


def test_nystrom_equals_exact_attention_when_every_token_is_a_landmark():
    torch.manual_seed(0)
    layer = NystromAttention(16, heads=2, landmarks=8, pinv_iterations=40, dropout=0.0).double().eval()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    q, k, v = layer.split_heads(x)
    exact = torch.softmax(q @ k.transpose(-1, -2), -1) @ v + layer.residual_conv(v)
    exact = layer.to_out(exact.transpose(1, 2).reshape(1, 8, 16))
    torch.testing.assert_close(layer(x), exact, atol=1e-7, rtol=1e-7)


def test_cls_attention_is_exact_and_folds_repeated_instances():
    torch.manual_seed(0)
    model = build_model("transmil", 6, 2, dim=32).double().eval()
    n = 5  # side 3: instances 0..3 are repeated to fill the 3 x 3 grid
    x = torch.randn(1, n, 6, dtype=torch.float64)
    captured = {}
    model.layer2.register_forward_pre_hook(lambda mod, args: captured.setdefault("h", args[0]))
    out = model(x)
    layer = model.layer2
    q, k, _ = layer.attention.split_heads(layer.norm(captured["h"]))
    weights = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), -1)[0, :, 0, 1:]  # [heads, 9] CLS row
    source = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    folded = torch.zeros(weights.shape[0], n, dtype=torch.float64).index_add_(1, source, weights)
    folded = folded / folded.sum(-1, keepdim=True)
    torch.testing.assert_close(out.extras["cls_attention_per_head"][0], folded)
    torch.testing.assert_close(out.attention[0, 0], folded.mean(0))
    assert math.isclose(out.attention.sum().item(), 1.0)


def test_order_matters_through_ppeg():
    """Why TransMIL is exempt from the permutation test: reordering changes the PPEG grid."""
    torch.manual_seed(0)
    model = build_model("transmil", 6, 2, dim=32).double().eval()
    x = torch.randn(1, 9, 6, dtype=torch.float64)
    assert not torch.allclose(model(x).logits, model(x[:, torch.randperm(9)]).logits)
