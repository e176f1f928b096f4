"""The remaining invariants of specs/asmil.md §6 (1, 2, 5, 7, 8, 9, 10, 11, 17) for NSF, the KL, the EMA anchor and
the ASMIL network."""

from __future__ import annotations

import math

import pytest
import torch

from milstudy.data.bags import Bag, BagListDataset
from milstudy.models import build_model
from milstudy.models.anchor import kl_to_online, nsf
from milstudy.train.optim import seed_everything
from milstudy.train.tasks import ClassificationTask
from milstudy.train.two_stage import TrainConfig, train_two_stage


def test_nsf_is_a_masked_distribution_and_maps_constants_to_uniform():  # §6.1
    z = torch.randn(3, 2, 20, dtype=torch.float64) * 4
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[2, 15:] = False
    p = nsf(z, mask)
    assert (p[mask[:, None].expand_as(p)] > 0).all() and (p[2, :, 15:] == 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, dtype=p.dtype), atol=1e-7, rtol=0)
    flat = nsf(torch.full((1, 1, 9), 2.5, dtype=torch.float64), torch.ones(1, 9, dtype=torch.bool))
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / 9), atol=1e-9, rtol=0)


def test_nsf_low_regime_is_softmax_and_nsf_is_not_shift_invariant():  # §6.2
    u = torch.rand(2, 1, 30, dtype=torch.float64) * 6 - 3
    mask = torch.ones(2, 30, dtype=torch.bool)
    torch.testing.assert_close(nsf(u - 30, mask, eps=0.0), torch.softmax(u, -1), atol=1e-10, rtol=0)
    assert not torch.allclose(nsf(u + 3, mask), nsf(u, mask))


def test_kl_is_nonnegative_zero_iff_equal_and_differs_from_cross_entropy_by_the_target_entropy():  # §6.5
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen)
    mask = torch.ones(2, 8, dtype=torch.bool)
    target = torch.softmax(torch.randn(2, 3, 8, dtype=torch.float64, generator=gen), -1)
    kl = kl_to_online(target, logits, mask)
    assert kl > 0
    assert kl_to_online(torch.softmax(logits, -1), logits, mask).abs() < 1e-12
    ce = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(ce - kl, entropy)


def test_copy_init_with_lr_zero_keeps_anchor_equal_to_online_and_buffers_follow():  # §6.7
    torch.manual_seed(0)
    model = build_model("abmil_anchor_nsf", 16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):
        opt.zero_grad()
        out = model.train()(torch.randn(1, 9, 16))
        (out.logits.sum() + out.aux_losses["anchor_kl"]).backward()
        opt.step()
        model.after_optimizer_step()
    online = {**dict(model.online.named_parameters()), **dict(model.online.named_buffers())}
    assert all(torch.equal(b, online[n]) for n, b in model.anchor.named_buffers())


def _bags(n: int = 24, seed: int = 0) -> list[Bag]:
    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        x = torch.randn(12, 8, generator=gen)
        y = i % 2
        x[:3, 0] += 2.0 * y
        bags.append(Bag(x, f"b{i}", y))
    return bags


def test_lambda_zero_trains_bit_identically_to_the_bare_model():  # §6.8
    bags = _bags()
    config = TrainConfig(epochs=3, lr=1e-2, device="cpu", quiet=True, seed=0)
    runs = []
    for name, kwargs in (("abmil", {}), ("abmil_anchor_nsf", {"anchor_lambda": 0.0})):
        seed_everything(0)
        model = build_model(name, 8, 2, **kwargs)
        fit = train_two_stage(model, ClassificationTask(2), BagListDataset(bags[:16]), BagListDataset(bags[16:]),
                              None, config)
        runs.append(fit.history["train_loss"].to_numpy())
    assert (runs[0] == runs[1]).all()


def test_no_drop_and_no_dropout_make_train_output_equal_eval_output_and_bernoulli_is_never_empty():  # §6.9
    torch.manual_seed(0)
    model = build_model("asmil_net", 16, 2, n_tokens=4, n_drop=0, dropout=0.0)
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(model.train()(x).logits, model.eval()(x).logits)
    bern = build_model("asmil_net", 16, 2, n_tokens=2, drop_rate=0.9, drop_mode="bernoulli").train()
    for _ in range(50):
        assert bern(torch.randn(3, 5, 16)).extras["token_keep"].any(-1).all()


def test_asmil_is_permutation_invariant_and_its_attention_rows_are_distributions():  # §6.10, §6.11
    torch.manual_seed(0)
    model = build_model("asmil", 16, 3, n_tokens=4, heads=2, dim=16).eval()
    with torch.no_grad():  # non-trivial attention: tokens away from their near-zero init
        model.online.tokens.normal_()
    x = torch.randn(1, 13, 16)
    perm = torch.randperm(13)
    a, b = model(x), model(x[:, perm])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention[..., perm], b.attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.extras["readout"][:, perm], b.extras["readout"], atol=1e-6, rtol=1e-5)
    assert a.attention.std() > 1e-3  # the permutation check sees non-uniform attention
    torch.testing.assert_close(a.attention.sum(-1), torch.ones(1, 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.extras["readout"].sum(-1), torch.ones(1), atol=1e-6, rtol=0)


def test_the_released_frozen_random_anchor_gives_a_nearly_uniform_nsf_target():  # §6.17
    torch.manual_seed(0)
    model = build_model("asmil", 32, 2, anchor_mode="frozen_random").train()
    out = model(torch.randn(1, 200, 32))
    target = out.extras["anchor_target"].double().clamp_min(1e-12)
    entropy = -(target * target.log()).sum(-1) / math.log(200)
    assert entropy.min() >= 0.99


def test_bad_anchor_options_are_refused():
    with pytest.raises(ValueError, match="anchor_mode"):
        build_model("abmil_anchor_nsf", 8, 2, anchor_mode="magic")
    with pytest.raises(ValueError, match="anchor_beta"):
        build_model("abmil_anchor_nsf", 8, 2, anchor_beta=1.5)
