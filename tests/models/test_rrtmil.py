"""RRTMIL (Tang et al. 2024, upstream DearCaat/RRT-MIL layout): region layout, R-MSA / CR-MSA, masking, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milstudy.models import PAD_LOGIT, build_model, masked_softmax
from milstudy.models.rrtmil import RegionBlock, RegionMSA, from_regions, grid_side, to_regions
from milstudy.train.metrics import roc_auc
from milstudy.train.tasks import SurvivalTask

IN_DIM = 12


def _model(**kwargs):
    torch.manual_seed(0)
    return build_model("rrtmil", IN_DIM, kwargs.pop("n_out", 2), **{"dim": 64, **kwargs}).double().eval()


def test_upstream_default_size():
    """D_in=1024, 2 classes, upstream defaults: 2,697,474 parameters (projection 524,800; R-MSA 1,051,776 with
    EPEG 128; CR-MSA 1,053,184 with phi 1,536; final LN 1,024; ABMIL head 65,664; classifier 1,026), counted from the
    shapes of upstream modules/rrt.py + rmsa.py + datten.py)."""
    model = build_model("rrtmil", 1024, 2)
    assert sum(p.numel() for p in model.parameters()) == 2_697_474
    assert model.crmsa.mixer.phi.shape == (512, 3)
    assert model.rmsa[0].mixer.attention.epeg.kernel_size == (15, 1)
    assert model.rmsa[0].regions == 8 and model.crmsa.regions == 8 and len(model.rmsa) == 1


@pytest.mark.parametrize("n_out", [2, 4])
def test_shapes_classification_and_survival_heads(n_out):
    model = _model(n_out=n_out)
    out = model(torch.randn(3, 20, IN_DIM, dtype=torch.float64))
    assert out.logits.shape == (3, n_out)
    assert out.attention.shape == out.attention_logits.shape == (3, 1, 20)
    assert out.extras["bag_embedding"].shape == (3, 64)
    if n_out == 4:  # discrete-time survival: n_out = n_bins
        task = SurvivalTask(bin_edges=[0.0, 10.0, 20.0, 30.0, 1e9])
        loss = task.loss(out.logits, torch.tensor([[5.0, 1.0], [25.0, 0.0], [40.0, 1.0]]))
        assert torch.isfinite(loss)


def test_grid_side_and_region_partition_round_trip():
    assert [grid_side(n, 8) for n in (1, 7, 64, 65, 100, 1000)] == [8, 8, 8, 16, 16, 32]
    assert [grid_side(n, 2) for n in (1, 4, 5, 10)] == [2, 2, 4, 4]
    x = torch.arange(16.0).view(1, 16, 1)  # 4 x 4 grid, 2 x 2 regions of 2 x 2 tokens
    regions = to_regions(x, 2)
    assert regions[0, :, :, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(from_regions(regions, 2), x)


def test_rmsa_mixes_only_within_a_region():
    """N = 100 with 8 regions: a 16 x 16 grid of 2 x 2 regions; instance 0 shares its region with 1, 16 and 17."""
    torch.manual_seed(0)
    block = RegionBlock(8, 8, RegionMSA(8, 2, 0.0, epeg_k=15, qkv_bias=True)).double().eval()
    h = torch.randn(1, 100, 8, dtype=torch.float64)
    valid = torch.ones(1, 100, dtype=torch.bool)
    moved = h.clone()
    moved[0, 0] += torch.randn(8, dtype=torch.float64)  # not a constant shift, which the LN would remove
    changed = (block(moved, valid, 16) - block(h, valid, 16)).abs().sum(-1)[0] > 1e-12
    assert changed.nonzero().flatten().tolist() == [0, 1, 16, 17]


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_attention_is_a_distribution_and_the_softmax_of_its_logits(n):
    """Bags whose N is not a multiple of anything in the layout (zero tokens fill the grid), upstream 8 regions."""
    model = _model()
    out = model(torch.randn(1, n, IN_DIM, dtype=torch.float64))
    mask = torch.ones(1, n, dtype=torch.bool)
    assert out.attention.shape == (1, 1, n) and (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, 1, dtype=torch.float64))
    torch.testing.assert_close(masked_softmax(out.attention_logits, mask), out.attention, atol=1e-12, rtol=0)
    assert out.attention_logits.requires_grad and torch.isfinite(out.logits).all()


def test_padded_batch_of_mixed_layouts_equals_bags_one_at_a_time():
    """Sides 8, 16, 16, 8 and 32 (8 regions): three layout groups, garbage in the padding, a non-prefix mask."""
    model = _model()
    sizes = (3, 70, 100, 9, 1000)
    padded = 3.0 * torch.randn(len(sizes), max(sizes), IN_DIM, dtype=torch.float64)
    mask = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for b, n in enumerate(sizes):
        mask[b, :n] = True
    mask[1] = mask[1].flip(0)  # bag 1's real instances sit at the end
    out = model(padded, mask=mask)
    for b, n in enumerate(sizes):
        single = model(padded[b : b + 1, mask[b]])
        torch.testing.assert_close(out.logits[b], single.logits[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.attention[b, :, mask[b]], single.attention[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(
            out.attention_logits[b, :, mask[b]], single.attention_logits[0], atol=1e-10, rtol=1e-10
        )
        assert (out.attention[b, :, ~mask[b]] == 0).all() and (out.attention_logits[b, :, ~mask[b]] == PAD_LOGIT).all()


def test_order_matters():
    """Why RRTMIL is exempt from the zoo's permutation test: regions are the instance order laid out as a grid."""
    model = _model(regions=2, crmsa_regions=2)
    x = torch.randn(1, 9, IN_DIM, dtype=torch.float64)
    assert not torch.allclose(model(x).logits, model(x[:, torch.randperm(9)]).logits)


def test_small_bags_have_one_token_regions_at_upstream_defaults():
    """Upstream behaviour kept: with 8 regions a bag of <= 64 instances has one-token regions, so CR-MSA's min-max
    dispatch is 0 (the block is the identity) and EPEG gets no gradient; a bag of 300 reaches every parameter."""
    model = _model()
    h = torch.randn(1, 50, 64, dtype=torch.float64)
    valid = torch.ones(1, 50, dtype=torch.bool)
    assert torch.equal(model.crmsa(h, valid, 8), h)
    for n, all_reached in ((50, False), (300, True)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(torch.randn(1, n, IN_DIM, dtype=torch.float64)).logits, torch.tensor([1])).backward()
        reached = all(p.grad is not None and p.grad.any() for p in model.parameters())
        assert reached == all_reached


def test_learns_a_toy_problem_with_padded_batches():
    """40 bags of 20-150 instances (several layout groups per batch); positives hold 3 instances shifted by +1.5
    on every channel; 30 full-batch Adam steps reach a training AUC above 0.9."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 151, (40,), generator=gen)
    labels = torch.arange(40) % 2
    x = torch.randn(40, int(sizes.max()), IN_DIM, generator=gen)
    mask = torch.arange(x.shape[1])[None, :] < sizes[:, None]
    for b in labels.nonzero().flatten().tolist():
        x[b, torch.randperm(int(sizes[b]), generator=gen)[:3]] += 1.5
    torch.manual_seed(0)
    model = build_model("rrtmil", IN_DIM, 2, dim=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        loss = F.cross_entropy(model(x, mask=mask).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(x, mask=mask).logits, -1)[:, 1]
    assert roc_auc(labels.tolist(), probabilities.numpy()) > 0.9


def test_bad_input_and_bad_options_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match=f"RRTMIL: feature dimension mismatch: the model expects D={IN_DIM}"):
        model(torch.randn(1, 5, IN_DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by the number of heads"):
        build_model("rrtmil", IN_DIM, 2, dim=60, heads=8)
    with pytest.raises(ValueError, match="pool_activation must be one of"):
        build_model("rrtmil", IN_DIM, 2, dim=64, pool_activation="sigmoid")
    with pytest.raises(ValueError, match="odd epeg_k"):
        build_model("rrtmil", IN_DIM, 2, dim=64, epeg_k=14)
