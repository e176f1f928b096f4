"""ABMILX identities of shared/specs/abmilx.md §6 (float64, eval mode, dropout off)."""

from __future__ import annotations

import math

import pytest
import torch

from milstudy.models import build_model
from milstudy.models.layers import masked_softmax, softmax_attention_times_vector

DIN, N = 12, 11


def make(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"dim": 16, "heads": 4, **kwargs}
    return build_model("abmilx", DIN, 3, **kwargs).double().eval()


def bag(batch: int = 2, n: int = N, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, DIN, generator=gen, dtype=torch.float64)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, n - 3 :] = False
    return x, mask


def internals(model, x, mask):
    hh = model.split_heads(model.embed(x))  # [B,m,N,d]
    local = model.local_attention(hh).squeeze(-1).masked_fill(~mask[:, None], 0.0)  # [B,m,N]
    return hh, local


def test_alpha_zero_equals_mhla_exactly():
    model = make(alpha_fixed=0.0)
    mhla = make(attn_plus=False)
    mhla.load_state_dict(model.state_dict(), strict=False)  # same shared weights; A+ weights unused
    x, mask = bag()
    out, ref = model(x, mask=mask), mhla(x, mask=mask)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.attention, ref.attention)


@pytest.mark.parametrize("backend,budget", [("chunked", 1 << 24), ("chunked", 7), ("sdpa", 0)])
def test_fused_attention_plus_equals_explicit_softmax_form(backend, budget):
    model = make()
    x, mask = bag()
    hh, local = internals(model, x, mask)
    q, k = model.queries_keys(hh)
    fused = model.alpha * softmax_attention_times_vector(q, k, local, mask, backend=backend, budget=budget or 1)
    explicit_u = torch.softmax(
        (q @ k.transpose(-1, -2) / math.sqrt(model.head_dim)).masked_fill(~mask[:, None, None], float("-inf")), -1
    )
    explicit = model.alpha * (explicit_u @ local.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(fused, explicit, atol=1e-10, rtol=0)
    torch.testing.assert_close(model.attention_plus_matrix(hh, mask), explicit_u, atol=1e-12, rtol=0)


def test_chunked_backward_matches_autograd_of_explicit_form():
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    assert torch.autograd.gradcheck(lambda q, k, a: softmax_attention_times_vector(q, k, a, mask, budget=20), (q, k, a))


def test_scaling_commutes_and_u_is_row_stochastic():
    model = make()
    x, mask = bag()
    hh, local = internals(model, x, mask)
    q, k = model.queries_keys(hh)
    alpha = 0.37
    torch.testing.assert_close(
        softmax_attention_times_vector(q, k, alpha * local, mask),
        alpha * softmax_attention_times_vector(q, k, local, mask),
        atol=1e-12,
        rtol=0,
    )
    u = model.attention_plus_matrix(hh, mask)
    assert (u >= 0).all()
    torch.testing.assert_close(u.sum(-1), torch.ones(u.shape[:-1], dtype=torch.float64))
    assert (u[-1, :, :, N - 3 :] == 0).all()  # padded keys get no weight


def test_shift_invariance_of_attention_plus():
    model = make(alpha_init=0.8)
    x, mask = bag()
    hh, local = internals(model, x, mask)
    c = 2.5
    g = local + model.attention_plus(hh, local, mask)
    g_shifted = (local + c) + model.attention_plus(hh, local + c, mask)
    torch.testing.assert_close(g_shifted, g + (1 + model.alpha.detach()) * c, atol=1e-12, rtol=0)
    torch.testing.assert_close(masked_softmax(g_shifted, mask), masked_softmax(g, mask), atol=1e-12, rtol=0)
    constant = torch.full_like(local, c)
    uniform = masked_softmax(constant + model.attention_plus(hh, constant, mask), mask)
    expected = (mask[:, None].double() / mask.sum(-1)[:, None, None]).expand_as(uniform)
    torch.testing.assert_close(uniform, expected, atol=1e-12, rtol=0)


def test_head_locality_and_per_head_pooling():
    model = make()
    x, mask = bag()
    h = model.embed(x)
    out = model.forward_embeddings(h, mask)
    hh = model.split_heads(h)
    torch.testing.assert_close(
        out.extras["head_embeddings"], torch.einsum("bmn,bmnd->bmd", out.attention, hh), atol=1e-12, rtol=0
    )
    j, d = 2, model.head_dim
    perturbed = h.clone()
    perturbed[..., j * d : (j + 1) * d] += torch.randn_like(perturbed[..., j * d : (j + 1) * d])
    z, z_new = out.extras["head_embeddings"], model.forward_embeddings(perturbed, mask).extras["head_embeddings"]
    others = [i for i in range(model.heads) if i != j]
    assert torch.equal(z_new[:, others], z[:, others])
    assert not torch.allclose(z_new[:, j], z[:, j])


def test_gradient_scaling_identity():
    """With the attention logits detached, dL/dH^j_i = w^j_i dL/dZ^j (the paper's core mechanism)."""
    model = make()
    x, mask = bag()
    h = model.embed(x).detach().requires_grad_(True)
    hh = model.split_heads(h)
    local = model.local_attention(hh.detach()).squeeze(-1).masked_fill(~mask[:, None], 0.0)
    g = (local + model.attention_plus(hh.detach(), local, mask)).detach()
    w = masked_softmax(g, mask)
    z = model.aggregate(w, hh)
    z.retain_grad()
    logits, _ = model.classify(z)
    logits.square().sum().backward()
    grad_h = model.split_heads(h.grad)  # [B,m,N,d]
    torch.testing.assert_close(grad_h, w.unsqueeze(-1) * z.grad.unsqueeze(2), atol=1e-12, rtol=0)


def test_single_head_mhla_with_constant_logits_is_mean_pooling():
    model = make(heads=1, attn_plus=False)
    torch.nn.init.zeros_(model.local_attention[2].weight)  # constant local logits
    x, mask = bag()
    h = model.embed(x)
    out = model.forward_embeddings(h, mask)
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.extras["head_embeddings"][:, 0], mean, atol=1e-12, rtol=0)


def test_eq17_modulation_on_model_internals():
    x, mask = bag()
    out = make(alpha_init=1.3)(x, mask=mask)
    a, delta = out.extras["local_logits"], out.extras["attn_plus_delta"]
    a_hat = masked_softmax(a, mask)
    expected = a_hat * delta.exp() / (a_hat * delta.exp()).sum(-1, keepdim=True)
    torch.testing.assert_close(out.attention, expected, atol=1e-12, rtol=0)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="heads=3 must divide dim=16"):
        make(heads=3)


@pytest.mark.parametrize("in_dim,count", [(1024, 801_473), (256, 407_489)])
def test_parameter_count_matches_table_1(in_dim, count):
    model = build_model("abmilx", in_dim, 2, dim=512, heads=8)
    assert sum(p.numel() for p in model.parameters()) == count


def test_alpha_options():
    torch.manual_seed(5)
    first = build_model("abmilx_cpu", DIN, 2).alpha.item()
    torch.manual_seed(5)
    assert build_model("abmilx_cpu", DIN, 2).alpha.item() == first  # randn init follows the torch seed
    fixed = build_model("abmilx_alpha1", DIN, 2)
    assert fixed.alpha.item() == 1.0 and "alpha" not in dict(fixed.named_parameters())
    assert build_model("abmilx_cpu", DIN, 2, alpha_init=0.5).alpha.item() == 0.5
    assert not hasattr(build_model("mhla", DIN, 2), "query")


def test_paper_minimal_drops_upstream_only_layers():
    full, minimal = make(), make(paper_minimal=True)
    extra = 16 * 16 + 16 + 2 * (16 // 4)  # W_proj, final LN weight, A+ LN weight+bias
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in minimal.parameters()) == extra
