"""DSMIL (Li et al. 2021): critical instance, distance attention, the two streams and the reference loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milstudy.models import build_model, combined_loss


def test_streams_and_critical_instance_ignore_padding():
    torch.manual_seed(0)
    model = build_model("dsmil", 5, 2).double().eval()
    x = torch.randn(1, 6, 5, dtype=torch.float64)
    x[0, 5] = 100 * model.instance_classifier.weight[0].detach()  # padded instance that would win class 0
    mask = torch.tensor([[True] * 5 + [False]])
    out = model(x, mask=mask)
    inst = out.extras["instance_logits"][0, :5]
    torch.testing.assert_close(out.extras["max_instance_logits"][0], inst.max(0).values)
    assert (out.extras["critical_index"] < 5).all()
    assert torch.equal(out.logits, out.extras["bag_logits"])  # predict="bag" (upstream default)
    # Eq. 4: the attention logits are <q_k, q_critical>/sqrt(128)
    q = model.query(x[0, :5])
    crit = out.extras["critical_index"][0]
    expected = q @ q[crit].T / 128**0.5  # [5, C]
    torch.testing.assert_close(out.attention_logits[0, :, :5], expected.T)


@pytest.mark.parametrize("predict", ["bag", "mean"])
def test_combined_loss_is_half_bag_plus_half_max_instance(predict):
    """The authors' train script: loss = 0.5 * CE(bag stream) + 0.5 * CE(max-instance stream), for either
    prediction; ``predict`` only changes the logits."""
    torch.manual_seed(0)
    model = build_model("dsmil", 5, 3, predict=predict).double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    targets = torch.tensor([0, 2, 1, 2])
    out = model(x)
    bag, top = out.extras["bag_logits"], out.extras["max_instance_logits"]
    by_hand = 0.5 * F.cross_entropy(bag, targets) + 0.5 * F.cross_entropy(top, targets)
    loss = combined_loss(out, lambda logits: F.cross_entropy(logits, targets))
    torch.testing.assert_close(loss, by_hand, atol=1e-14, rtol=0)
    assert not torch.allclose(loss, F.cross_entropy(out.logits, targets))  # not the loss on the prediction alone
    prediction = bag if predict == "bag" else 0.5 * (bag + top)
    torch.testing.assert_close(out.logits, prediction, atol=0, rtol=0)
    loss.backward()  # the max-instance stream trains the instance classifier (the bag stream cannot: argmax)
    assert model.instance_classifier.weight.grad.abs().sum() > 0


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="predict must be one of"):
        build_model("dsmil", 5, 2, predict="max")
