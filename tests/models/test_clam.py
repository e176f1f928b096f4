"""CLAM-SB (Lu et al. 2021): instance loss, top-k pseudo-labels, the targets mechanism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milstudy.models import build_model
from milstudy.models.clam import smooth_top1_svm_loss


def make(**kwargs):
    torch.manual_seed(0)
    return build_model("clam_sb", 6, 2, **kwargs).double().eval()


def test_smooth_svm_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    # row 1: log(e^2 + e^(0.5+1)) - 2; row 2: log(e^0 + e^(1+1)) - 0
    expected = ((torch.log(torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(1.5))) - 2.0)
                + torch.log(1 + torch.exp(torch.tensor(2.0)))) / 2
    torch.testing.assert_close(smooth_top1_svm_loss(logits, target), expected.double())


def test_instance_loss_uses_top_and_bottom_k_of_the_true_class():
    model = make(k_sample=2, instance_loss="ce", instance_loss_weight=1.0)
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    out = model(x, targets=torch.tensor([1]))
    h = model.embed(x)[0]
    w = out.attention[0, 0]
    top, bottom = torch.topk(w, 2).indices, torch.topk(-w, 2).indices
    logits = model.instance_classifiers[1](torch.cat([h[top], h[bottom]]))
    expected = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0]))
    torch.testing.assert_close(out.aux_losses["instance"], expected)


def test_no_targets_no_aux_loss_and_k_clamped_on_tiny_bags():
    model = make()
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    assert model(x).aux_losses == {}
    assert torch.isfinite(model(x, targets=torch.tensor([0])).aux_losses["instance"])  # k=8 -> 1 on N=3


def test_subtyping_trains_every_instance_classifier_from_one_label():
    model = make(subtyping=True)
    out = model(torch.randn(1, 9, 6, dtype=torch.float64), targets=torch.tensor([0]))
    out.aux_losses["instance"].backward()
    assert all(c.weight.grad is not None and c.weight.grad.any() for c in model.instance_classifiers)


def test_bad_targets_error():
    with pytest.raises(ValueError, match="targets must be 2 class indices"):
        make()(torch.randn(2, 4, 6, dtype=torch.float64), targets=torch.tensor([0.5, 1.0]))


def test_instance_loss_of_a_padded_batch_equals_the_unpadded_bags():
    """A bag without padding takes the no-copy path, a padded one the masked path: the same loss and gradients."""
    torch.manual_seed(0)
    model = build_model("clam_sb", 16, 2, dropout=0.0)
    x, targets = torch.randn(2, 30, 16), torch.tensor([1, 0])
    plain = model(x, targets=targets).aux_losses["instance"]
    grads = torch.autograd.grad(plain, list(model.parameters()), allow_unused=True)
    padded_x = torch.cat([x, torch.randn(2, 6, 16)], dim=1)
    mask = torch.ones(2, 36, dtype=torch.bool)
    mask[:, 30:] = False
    padded = model(padded_x, mask=mask, targets=targets).aux_losses["instance"]
    padded_grads = torch.autograd.grad(padded, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(padded, plain)
    for g, h in zip(grads, padded_grads):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(h, g)
