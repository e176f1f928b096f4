"""ASMIL and the anchor plug-in (spec asmil.md §6): first invariants; more are listed in the branch report."""

from __future__ import annotations

import pytest
import torch

from milstudy.models import build_model
from milstudy.models.anchor import kl_to_online, nsf


def test_anchor_params_are_not_parameters_and_get_no_grad():
    torch.manual_seed(0)
    model = build_model("abmil_anchor_nsf", 16, 2).train()
    anchor_ids = {id(b) for b in model.anchor.buffers()}
    assert not anchor_ids & {id(p) for p in model.parameters()}
    out = model(torch.randn(2, 7, 16))
    (out.logits.sum() + out.aux_losses["anchor_kl"]).backward()
    assert all(not b.requires_grad and b.grad is None for b in model.anchor.buffers())


def test_beta_zero_copies_online_and_beta_one_keeps_anchor():
    for beta, same in [(0.0, True), (1.0, False)]:
        torch.manual_seed(0)
        model = build_model("abmil_anchor", 16, 2, anchor_beta=beta)
        with torch.no_grad():
            for p in model.online.parameters():
                p.add_(1.0)
        model.after_optimizer_step()
        online = dict(model.online.named_parameters())
        assert all(torch.equal(b, online[n]) == same for n, b in model.anchor.named_buffers())


def test_kl_gradient_closed_form_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    target = nsf(torch.randn(2, 3, 5, dtype=torch.float64, generator=gen), mask, eps=0.0)
    kl_to_online(target, logits, mask).backward()
    torch.testing.assert_close(logits.grad, (torch.softmax(logits.detach(), -1) - target) / 6)


def test_eval_returns_online_output_and_exact_drop_count():
    torch.manual_seed(0)
    model = build_model("asmil", 16, 2, n_tokens=8, n_drop=3)
    x = torch.randn(2, 7, 16)
    model.train()
    keep = model(x).extras["token_keep"]
    assert (keep.sum(-1) == 5).all()
    model.eval()
    out = model(x)
    assert out.aux_losses == {} and out.extras["token_keep"].all()
    torch.testing.assert_close(out.logits, model.online(x).logits)


def test_entmax_target_is_a_masked_distribution_between_softmax_and_sparsemax():
    import torch

    from milstudy.models.anchor import entmax_target

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50, dtype=torch.float64) * 3
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 40:] = False
    soft = torch.softmax(logits.masked_fill(~mask[:, None], float("-inf")), -1)
    for alpha in (1.0, 1.25, 1.5, 2.0):
        p = entmax_target(logits, mask, alpha)
        assert torch.allclose(p.sum(-1), torch.ones(2, 3, dtype=p.dtype), atol=1e-6)
        assert (p[1, :, 40:] == 0).all() and (p >= 0).all()
    assert torch.allclose(entmax_target(logits, mask, 1.0), soft, atol=1e-5)
    assert (entmax_target(logits, mask, 2.0) == 0).float().mean() > 0.5  # sparsemax: most tiles exactly 0
    assert not (soft == 0)[:, :, :40].any()
    with pytest.raises(ValueError, match="entmax_alpha"):
        entmax_target(logits, mask, 0.5)


def test_token_init_std_sets_the_feat_and_cls_token_scale_and_is_checked():
    """Upstream draws the FEAT and CLS tokens from N(0, (1e-6)^2), so the first attention is uniform; the option
    exists to study that start (issue 12: ASMIL's training loss stays at ln 2 on notebook 20's world)."""
    torch.manual_seed(0)
    default = build_model("asmil_net", 16, 2, dim=64, heads=4, n_tokens=8)
    assert float(default.tokens.abs().max()) < 1e-5 and float(default.cls.abs().max()) < 1e-5
    wide = build_model("asmil_net", 16, 2, dim=64, heads=4, n_tokens=8, token_init_std=1.0)
    assert 0.8 < float(wide.tokens.std()) < 1.2
    x = torch.randn(1, 30, 16)
    attention = default.eval()(x).attention
    assert torch.allclose(attention, torch.full_like(attention, 1 / 30), atol=1e-4)  # uniform at the upstream init
    assert float(wide.eval()(x).attention.std()) > 1e-3
    with pytest.raises(ValueError, match="token_init_std"):
        build_model("asmil_net", 16, 2, token_init_std=0.0)


def test_anchor_warmup_keeps_the_kl_off_for_k_epochs_while_the_ema_tracks():
    torch.manual_seed(0)
    model = build_model("abmil_anchor_nsf", 16, 2, anchor_warmup_epochs=2).train()
    assert "epochs_done" in model.state_dict()
    x = torch.randn(1, 9, 16)
    start = {k: v.clone() for k, v in model.anchor.named_buffers()}
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(0.5)
    model.after_optimizer_step()  # the EMA moves during the warm-up
    assert any(not torch.equal(start[k], v) for k, v in model.anchor.named_buffers())
    for epoch in (1, 2):
        assert "anchor_kl" not in model(x).aux_losses
        model.on_epoch_end(epoch)
    assert "anchor_kl" in model(x).aux_losses  # from epoch 3 on
    resumed = build_model("abmil_anchor_nsf", 16, 2, anchor_warmup_epochs=2).train()
    resumed.load_state_dict(model.state_dict())  # a resumed run knows the warm-up is over
    assert "anchor_kl" in resumed(x).aux_losses
    assert "epochs_done" not in build_model("abmil_anchor_nsf", 16, 2).state_dict()  # no warm-up, no new state
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="anchor_warmup_epochs"):
            build_model("abmil_anchor_nsf", 16, 2, anchor_warmup_epochs=bad)
