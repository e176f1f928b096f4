"""Mean / max pooling and ABMIL (Ilse et al. 2018 Eqs. 7-9) against hand computations."""

from __future__ import annotations

import torch

from milstudy.models import build_model


def test_mean_and_max_pooling_match_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    mean = build_model("mean_pooling", 4, 2).double().eval()
    h = mean.embed(x)[0]
    torch.testing.assert_close(mean(x).logits[0], mean.classifier(h.mean(0)))
    maxp = build_model("max_pooling", 4, 2).double().eval()
    out = maxp(x)
    torch.testing.assert_close(out.logits[0], maxp.classifier(maxp.embed(x)[0].max(0).values))
    torch.testing.assert_close(out.extras["argmax_share"].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_abmil_plain_and_gated_equations():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    for name in ("abmil", "abmil_gated"):
        model = build_model(name, 4, 2).double().eval()
        h = model.embed(x)[0]  # [N,L]
        s = model.scorer
        hidden = torch.tanh(s.tanh_branch[0](h))
        if name == "abmil_gated":
            hidden = hidden * torch.sigmoid(s.gate_branch[0](h))  # Eq. 9
        a = torch.softmax(s.score(hidden)[:, 0], 0)  # Eq. 8 / 9
        out = model(x)
        torch.testing.assert_close(out.attention[0, 0], a)
        torch.testing.assert_close(out.logits[0], model.classifier(a @ h))  # Eq. 7


def test_abmil_upstream_layout_is_ln_gelu_dropout_without_any_bias():
    """The ABMILX code's ABMIL baseline (spec §2.5, issue 9): LN -> Linear -> GELU -> dropout 0.25, tanh attention,
    LN before the classifier, and no bias anywhere (so the parameter count is exact)."""
    torch.manual_seed(0)
    d_in, width, classes = 6, 8, 3
    model = build_model("abmil_upstream", d_in, classes, hidden_dim=width).double().eval()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    n_params = d_in + d_in * width + width * 128 + 128 + width + width * classes  # LN, W_e, V, w, LN, W_c
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert isinstance(model.embed[2], torch.nn.GELU) and model.embed[3].p == 0.25
    x = torch.randn(1, 5, d_in, dtype=torch.float64)
    norm = torch.nn.functional.layer_norm
    h = torch.nn.functional.gelu(norm(x[0], (d_in,), model.embed[0].weight) @ model.embed[1].weight.T)
    a = torch.softmax(torch.tanh(h @ model.scorer.tanh_branch[0].weight.T) @ model.scorer.score.weight[0], 0)
    logits = norm(a @ h, (width,), model.out_norm.weight) @ model.classifier.weight.T
    torch.testing.assert_close(model(x).logits[0], logits)
    torch.testing.assert_close(model(x).attention[0, 0], a)
    # the default ABMIL keeps its biases (Ilse et al.)
    assert any(name.endswith("bias") for name, _ in build_model("abmil", d_in, classes).named_parameters())
