"""The one model contract (DESIGN.md "Interfaces"), for every registered model: ``attention_logits`` whose masked
softmax is ``attention`` and that carries gradient, the training hooks, and ``combined_loss``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milstudy.models import PAD_LOGIT, MILModel, MILOutput, build_model, combined_loss, list_models, masked_softmax

MODELS = [name for name in list_models() if not name.startswith("e2e_test_")]  # e2e_test_*: test stand-ins
IN_DIM = 16
# Models with attention weights but no scores behind them (name -> reason); they report attention_logits=None.
NO_ATTENTION_LOGITS = {"mean_pooling": "uniform weights 1/n over the real instances; no score produces them"}
# Models whose loss is not the default (task loss on the logits, weight 1, no streams).
LOSS_STREAMS = {name: "0.5 CE(bag stream) + 0.5 CE(max-instance stream), tests/models/test_dsmil.py"
                for name in ("dsmil", "dsmil_anchor", "dsmil_anchor_nsf")}
LOSS_STREAMS["acmil"] = "task(slide) + mean of the K branch losses + diversity, tests/models/test_acmil.py"


def _toy_batch(toy_bags, dtype: torch.dtype, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two conftest toy bags (one with a key instance) of 10 and 6 instances; padded: one [2, 10] batch with
    garbage in the padding and its mask, unpadded: the 10-instance bag alone and no mask."""
    long_bag, _ = toy_bags(2, n_instances=10, seed=0)
    short_bag, _ = toy_bags(2, n_instances=6, seed=1)
    if not padded:
        return long_bag[1:].to(dtype), None
    x = 3.0 * torch.randn(2, 10, IN_DIM, generator=torch.Generator().manual_seed(2))
    x[0], x[1, :6] = long_bag[1], short_bag[1]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    return x.to(dtype), mask


def _build(name: str, test_kwargs: dict, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, IN_DIM, 3, **test_kwargs.get(name, {})).to(dtype).eval()


def check_attention_logits(out: MILOutput, mask: torch.Tensor, atol: float) -> None:
    """The contract of ``attention_logits`` on one output (mask ``[B, N]``, True = real)."""
    assert out.attention_logits is not None, "the model returns attention but no attention_logits"
    logits = out.attention_logits
    assert logits.shape == out.attention.shape, f"attention_logits {tuple(logits.shape)} vs {tuple(out.attention.shape)}"
    assert logits.requires_grad, "attention_logits carry no gradient"
    torch.testing.assert_close(masked_softmax(logits, mask), out.attention, atol=atol, rtol=0)
    torch.testing.assert_close(torch.softmax(logits, -1), out.attention, atol=atol, rtol=0)  # PAD_LOGIT -> weight 0
    real = mask[:, None, :].expand_as(logits)
    assert torch.isfinite(logits[real]).all()
    assert (logits[~real] == PAD_LOGIT).all(), "padded positions must hold exactly PAD_LOGIT"


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", MODELS)
def test_masked_softmax_of_attention_logits_is_the_attention(name, padded, dtype, atol, toy_bags, call_model,
                                                              test_kwargs):
    model = _build(name, test_kwargs, dtype)
    x, mask = _toy_batch(toy_bags, dtype, padded)
    out = call_model(model, x, mask=mask)
    if out.attention is None or name in NO_ATTENTION_LOGITS:
        assert out.attention_logits is None, f"{name}: attention_logits without attention"
        return
    assert "attention_logits" not in out.extras, "one copy only: the field, not extras"
    check_attention_logits(out, torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask, atol)


def test_a_model_with_attention_but_no_logits_fails_the_check():
    attention = torch.full((1, 1, 4), 0.25)
    with pytest.raises(AssertionError, match="no attention_logits"):
        check_attention_logits(MILOutput(torch.zeros(1, 2), attention), torch.ones(1, 4, dtype=torch.bool), 1e-6)


def _grad_norms(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
def test_a_loss_on_attention_logits_alone_trains_the_attention(name, toy_bags, call_model, test_kwargs):
    """sum over real instances of logits x random weights: every parameter that moves the attention gets gradient
    from the logits (no no_grad / detach on the path), and some parameter does."""
    model = _build(name, test_kwargs)
    x, mask = _toy_batch(toy_bags, torch.float64, padded=True)
    out = call_model(model, x, mask=mask)
    if out.attention_logits is None:
        assert out.attention is None or name in NO_ATTENTION_LOGITS
        pytest.skip(f"{name} has no attention scores")
    real = mask[:, None, :].expand_as(out.attention)
    gen = torch.Generator().manual_seed(3)
    w_logits = torch.randn(out.attention.shape, generator=gen, dtype=torch.float64)
    w_attention = torch.randn(out.attention.shape, generator=gen, dtype=torch.float64)
    from_logits = _grad_norms(model, (out.attention_logits[real] * w_logits[real]).sum())
    out = call_model(model, x, mask=mask)
    from_attention = _grad_norms(model, (out.attention[real] * w_attention[real]).sum())
    moves_attention = {n for n, g in from_attention.items() if g > 0}
    trained = {n for n, g in from_logits.items() if g > 0}
    assert moves_attention, f"{name}: no parameter moves the attention"
    assert moves_attention <= trained, f"{name}: no gradient from attention_logits to {moves_attention - trained}"
    assert all(torch.isfinite(torch.tensor(g)) for g in from_logits.values())


@pytest.mark.parametrize("name", MODELS)
def test_every_model_is_a_milmodel_with_noop_hooks(name, test_kwargs):
    model = _build(name, test_kwargs)
    assert isinstance(model, MILModel)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.after_optimizer_step() is None
    assert model.on_epoch_end(1) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", [n for n in MODELS if n not in LOSS_STREAMS])
def test_default_combined_loss_is_task_loss_plus_aux(name, toy_bags, call_model, test_kwargs):
    model = _build(name, test_kwargs)
    x, mask = _toy_batch(toy_bags, torch.float64, padded=True)
    targets = torch.tensor([1, 2])
    out = call_model(model, x, mask=mask, targets=targets)
    assert out.logits_weight == 1.0 and out.loss_streams == {}
    task = lambda logits: F.cross_entropy(logits, targets)  # noqa: E731
    expected = task(out.logits)
    for aux in out.aux_losses.values():
        expected = expected + aux
    assert torch.equal(combined_loss(out, task), expected)


def test_combined_loss_weights_streams_and_checks_their_shape():
    logits, stream = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 2.0]])
    aux = {"extra": torch.tensor(0.25)}
    task = lambda z: F.cross_entropy(z, torch.tensor([0]))  # noqa: E731
    out = MILOutput(logits, aux_losses=aux, logits_weight=0.3, loss_streams={"s": (stream, 0.7)})
    torch.testing.assert_close(combined_loss(out, task), 0.3 * task(logits) + 0.7 * task(stream) + 0.25)
    with pytest.raises(ValueError, match=r"loss_streams\['s'\] has shape"):
        combined_loss(MILOutput(logits, loss_streams={"s": (stream[0], 1.0)}), task)
