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
