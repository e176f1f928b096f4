"""Online attention normalisations (ASMIL S7: NSF online, the Eq. 34 mixture; spec §6 invariant 16)."""

from __future__ import annotations

import pytest
import torch

from milstudy.models import build_model
from milstudy.models.anchor import nsf
from milstudy.models.attention_normalization import AttentionNormalization, mixture_logits
from milstudy.models.layers import masked_softmax


def _scores(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 2, 7, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    return scores, mask


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9952, 1.0])
def test_mixture_is_a_distribution_and_alpha_one_is_the_softmax(alpha):
    scores, mask = _scores()
    log_a = torch.log(torch.tensor(alpha, dtype=torch.float64))
    log_b = torch.log(torch.tensor(1.0 - alpha, dtype=torch.float64))
    weights = masked_softmax(mixture_logits(scores, mask, log_a, log_b), mask)
    assert (weights >= 0).all() and (weights[~mask[:, None, :].expand_as(weights)] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    sig = torch.sigmoid(scores).masked_fill(~mask[:, None, :], 0.0)
    expected = alpha * masked_softmax(scores, mask) + (1 - alpha) * sig / sig.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    if alpha == 1.0:
        torch.testing.assert_close(weights, masked_softmax(scores, mask), rtol=0, atol=1e-15)


def test_online_nsf_logits_give_the_normalised_sigmoid_and_extreme_scores_keep_finite_gradients():
    scores, mask = _scores(1)
    logits = AttentionNormalization("nsf")(scores, mask)
    torch.testing.assert_close(masked_softmax(logits, mask), nsf(scores, mask, eps=0.0), rtol=0, atol=1e-12)
    mixture = AttentionNormalization("mixture")
    assert mixture.alpha == pytest.approx(0.5)  # rho_0 = 0
    extreme = (torch.tensor([[[-300.0, -200.0, 0.0, 250.0]]], dtype=torch.float32)).requires_grad_()
    out = masked_softmax(mixture(extreme, torch.ones(1, 4, dtype=torch.bool)), torch.ones(1, 4, dtype=torch.bool))
    (out * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(extreme.grad).all() and torch.isfinite(mixture.rho.grad) and mixture.rho.grad != 0
    with pytest.raises(ValueError, match="normalization"):
        AttentionNormalization("sparsemax")


@pytest.mark.parametrize("kind", ["softmax", "nsf", "mixture"])
def test_abmil_keeps_the_logit_identity_and_padding_invariance(kind):
    torch.manual_seed(0)
    model = build_model("abmil", 6, 2, hidden_dim=16, attention_dim=8, attention_normalization=kind).eval()
    x = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = model(x, mask=mask)
    torch.testing.assert_close(masked_softmax(out.attention_logits, mask), out.attention, rtol=0, atol=1e-6)
    alone = model(x[1:, :6])
    torch.testing.assert_close(alone.logits, out.logits[1:], rtol=1e-5, atol=1e-6)
    assert ("attention_scores" in out.extras) == (kind != "softmax")
    if kind == "mixture":
        out.logits.sum().backward()
        assert model.normalization.rho.grad is not None and model.normalization.rho.grad != 0


def test_default_abmil_state_is_unchanged_and_the_anchor_normalises_raw_scores():
    keys = set(build_model("abmil", 6, 2).state_dict())
    assert not any("normalization" in k for k in keys)
    assert "normalization.rho" in build_model("abmil", 6, 2, attention_normalization="mixture").state_dict()
    torch.manual_seed(1)
    x = torch.randn(2, 12, 6)
    # NSF online and an NSF target from the anchor's raw scores: at init (anchor = online) the KL is exactly 0;
    # with the softmax online it is not.
    for kind, zero in (("nsf", True), ("softmax", False)):
        torch.manual_seed(2)
        model = build_model("abmil_anchor_nsf", 6, 2, hidden_dim=16, attention_normalization=kind).train()
        kl = float(model(x).aux_losses["anchor_kl"].detach())
        assert (abs(kl) < 1e-6) == zero, (kind, kl)
