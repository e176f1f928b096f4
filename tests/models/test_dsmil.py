"""DSMIL (Li et al. 2021): critical instance, distance attention, combined streams."""

from __future__ import annotations

import torch

from milstudy.models import build_model


def test_streams_combine_and_critical_instance_ignores_padding():
    torch.manual_seed(0)
    model = build_model("dsmil", 5, 2).double().eval()
    x = torch.randn(1, 6, 5, dtype=torch.float64)
    x[0, 5] = 100 * model.instance_classifier.weight[0].detach()  # padded instance that would win class 0
    mask = torch.tensor([[True] * 5 + [False]])
    out = model(x, mask=mask)
    inst = out.extras["instance_logits"][0, :5]
    torch.testing.assert_close(out.extras["max_instance_logits"][0], inst.max(0).values)
    assert (out.extras["critical_index"] < 5).all()
    torch.testing.assert_close(out.logits, 0.5 * (out.extras["bag_logits"] + out.extras["max_instance_logits"]))
    # Eq. 4: the attention logits are <q_k, q_critical>/sqrt(128)
    q = model.query(x[0, :5])
    crit = out.extras["critical_index"][0]
    expected = q @ q[crit].T / 128**0.5  # [5, C]
    torch.testing.assert_close(out.extras["attention_logits"][0, :, :5], expected.T)
