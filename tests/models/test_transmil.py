"""TransMIL (Shao et al. 2021) and the Nyström attention layer (Xiong et al. 2021)."""

from __future__ import annotations

import math

import pytest
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
    torch.testing.assert_close(out.attention[0], folded)  # per head, [heads, n]
    assert out.attention.shape == (1, model.layer2.attention.heads, n)
    # the logits fold the copies by logsumexp: instance 0 has tokens 0 and 5, instance 4 only token 4
    logits = (q[:, :, :1] @ k.transpose(-1, -2))[0, :, 0, 1:]  # [heads, 9] CLS -> token logits
    torch.testing.assert_close(out.attention_logits[0, :, 0], torch.logaddexp(logits[:, 0], logits[:, 5]))
    torch.testing.assert_close(out.attention_logits[0, :, 4], logits[:, 4])
    assert math.isclose(out.attention.sum().item(), model.layer2.attention.heads)


def test_order_matters_through_ppeg():
    """Why TransMIL is exempt from the permutation test: reordering changes the PPEG grid."""
    torch.manual_seed(0)
    model = build_model("transmil", 6, 2, dim=32).double().eval()
    x = torch.randn(1, 9, 6, dtype=torch.float64)
    assert not torch.allclose(model(x).logits, model(x[:, torch.randperm(9)]).logits)


def test_short_sequences_get_exact_attention_and_upstream_padding_stays_available():
    """A bag with 1 + s² <= landmarks tokens: exact softmax attention (what Nyström approximates when every token is
    a landmark), not upstream's zero-padding to the landmark count, which the zero tokens' softmax share changes."""
    torch.manual_seed(0)
    layer = build_model("transmil", 6, 2, dim=16, heads=2).double().eval().layer1  # 8 landmarks
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = layer.attention.split_heads(layer.norm(x))
    exact = torch.softmax(q @ k.transpose(-1, -2), -1) @ v + layer.attention.residual_conv(v)
    exact = x + layer.attention.to_out(exact.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(layer(x), exact, atol=1e-12, rtol=1e-12)
    layer.exact_short = False  # upstream: zero-padded to 8 tokens, Nyström
    assert not torch.allclose(layer(x), exact, atol=1e-3)
    torch.testing.assert_close(layer(x), x + layer.attention(layer.norm(x)))


def test_padded_batch_of_long_bags_equals_bags_one_at_a_time():
    """Bags longer than the landmarks (Nyström path; its pinv scale couples a batch) and of mixed grid sides."""
    torch.manual_seed(0)
    model = build_model("transmil", 6, 2, dim=16, heads=2).double().eval()  # 8 landmarks
    sizes = (10, 12, 20, 3)  # sides 4, 4, 5 (Nyström: 17 and 26 tokens) and 2 (exact: 5 tokens)
    padded = 3.0 * torch.randn(len(sizes), max(sizes), 6, dtype=torch.float64)
    mask = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for b, n in enumerate(sizes):
        mask[b, :n] = True
    out = model(padded, mask=mask)
    for b, n in enumerate(sizes):
        single = model(padded[b : b + 1, :n])
        torch.testing.assert_close(out.logits[b], single.logits[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.attention[b, :, :n], single.attention[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.attention_logits[b, :, :n], single.attention_logits[0], atol=1e-10, rtol=1e-10)
        assert (out.attention[b, :, n:] == 0).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_ppeg_merged_kernel_equals_identity_plus_three_depthwise_convolutions(dtype, tol):
    """PPEG runs identity + conv7 + conv5 + conv3 as one 7 x 7 convolution: the same output and the same
    gradients for every conv's weight and bias and for the input, as the four passes of the authors' layout."""
    from milstudy.models.transmil import PPEG

    torch.manual_seed(0)
    ppeg = PPEG(6).to(dtype)
    side = 5
    x = torch.randn(2, 1 + side * side, 6, dtype=dtype, requires_grad=True)
    y = torch.randn(2, 1 + side * side, 6, dtype=dtype)

    def reference(x):
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in ppeg.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    outputs, grads = [], []
    for fn in (ppeg.forward, reference):
        ppeg.zero_grad()
        x.grad = None
        out = fn(x, side) if fn == ppeg.forward else fn(x)
        (out * y).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad.clone(), *(p.grad.clone() for p in ppeg.parameters())])
    torch.testing.assert_close(outputs[0], outputs[1], atol=tol, rtol=tol)
    assert torch.equal(outputs[0][:, 0], x[:, 0].detach())  # the cls token is untouched
    for merged, separate in zip(*grads):
        torch.testing.assert_close(merged, separate, atol=tol, rtol=tol)
    assert sorted(k for k, _ in ppeg.named_parameters()) == sorted(
        f"convs.{i}.{p}" for i in range(3) for p in ("weight", "bias"))  # the authors' parameters, state dict kept
