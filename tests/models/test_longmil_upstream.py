"""LongMIL ``preset="upstream"`` (specs/longmil.md §3.2-3.6): the released code's behaviours, each option alone,
checked through q = k = 0 attention (log(A_ij / A_ii) is the bias, D_ii = 0); the paper preset is unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from milstudy.models import build_model
from milstudy.models.longmil import PRESETS, grid_positions, record_attention

SLOPES4 = [0.25, 0.0625, 0.015625, 0.00390625]
GRID = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(7), indexing="xy"), -1).reshape(1, -1, 2)
ALL = torch.ones(1, 49, dtype=torch.bool)


def _bias(block, positions=GRID):
    """``[h, N, N]`` log(A_ij / A_ii) of the block's attention with q = k = 0 (-inf where A_ij = 0)."""
    n = positions.shape[1]
    zeros = torch.zeros(1, block.heads, n, 4, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64).expand(1, block.heads, n, n)
    with torch.no_grad():
        a = block.attend(zeros, zeros, eye, positions, torch.ones(1, n, dtype=torch.bool))[0]
    return a.log() - torch.diagonal(a, dim1=-2, dim2=-1).log().unsqueeze(-1)


DISTANCE = ((GRID[0, :, None] - GRID[0, None]) ** 2).sum(-1).double().sqrt()  # exact: sqrt of integers


def _model(**kwargs):
    torch.manual_seed(0)
    return build_model("longmil", 6, 3, **{"dim": 16, "radius": 3.0, "stride": 1.0, **kwargs}).double().eval()


def test_the_paper_preset_is_unchanged():
    """Logits, gradient and state-dict keys recorded before the presets existed (commit 45c7086), to 1e-12
    relative in float64 and 1e-6 in float32: the last bits of a float64 reduction depend on the CPU (6 ulp apart on an AMD EPYC), a code change
    moves them by far more."""
    n = 40
    coords = torch.stack([torch.arange(n) % 7, torch.arange(n) // 7], -1).unsqueeze(0) * 256
    for kwargs in ({}, {"preset": "paper"}):
        torch.manual_seed(0)
        model = build_model("longmil", 6, 3, dim=16, heads=4, radius=3.0, **kwargs).double()
        x = torch.randn(1, n, 6, dtype=torch.float64)
        model(x, coords=coords).logits.sum().backward()
        grad_norm2 = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
        assert math.isclose(grad_norm2, float.fromhex("0x1.96386260b0756p+7"), rel_tol=1e-12)
        with torch.no_grad():
            logits = model.eval()(x, coords=coords).logits[0].tolist()
        recorded = ["-0x1.bca07d9bf61c2p-1", "0x1.bacf88ca75d5cp-1", "-0x1.d5251d3db805cp-4"]
        assert all(math.isclose(v, float.fromhex(r), rel_tol=1e-12) for v, r in zip(logits, recorded, strict=True))
        torch.manual_seed(0)
        model = build_model("longmil", 6, 3, dim=16, radius=3.0, **kwargs).eval()  # float32, 1 head
        x = torch.randn(1, n, 6)
        recorded = [-0.7399708032608032, 0.7686008214950562, -0.2072339653968811]  # float32: to 1e-6 relative
        logits = model(x, coords=coords).logits[0].tolist()
        assert all(math.isclose(v, r, rel_tol=1e-6) for v, r in zip(logits, recorded, strict=True))
    blocks = [f"{part}.{i}" for part, count in (("local", 2), ("globals", 1)) for i in range(count)]
    layer = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "qkv.weight", "proj.weight", "proj.bias",
             "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"]
    keys = ["project.0.weight", "project.0.bias", *[f"{b}.{k}" for b in blocks for k in layer], "norm.weight",
            "norm.bias", "head.weight", "head.bias"]
    assert list(model.state_dict()) == keys
    upstream = build_model("longmil", 6, 3, dim=16, radius=3.0, preset="upstream")
    upstream.load_state_dict(build_model("longmil", 6, 3, dim=16, heads=4).state_dict())  # same keys and shapes
    assert model.options == PRESETS["paper"] and upstream.options == PRESETS["upstream"]


def test_upstream_layout_has_four_heads_no_pooling_and_attention_dropout():
    model = _model(preset="upstream", eval_dropout=False)
    assert [b.heads for b in (*model.local, *model.globals)] == [4, 4, 4] and not model.pool
    assert {b.attn_dropout for b in (*model.local, *model.globals)} == {0.05}
    x = torch.randn(1, 49, 6, dtype=torch.float64)
    with record_attention(model) as records:
        model(x, coords=GRID)
    assert [r["attention"].shape[-1] for r in records] == [49, 49, 49]  # the global layer sees every token
    model.train()(x, coords=GRID).logits.sum().backward()
    assert all(math.isfinite(float(p.grad.abs().sum())) for p in model.parameters())


def test_only_the_largest_slope_head_is_masked_and_distances_are_truncated():
    """Spec §3.2 (§6.4 in reverse) and §3.3 with hand values: row of (0, 0) on a 7 x 7 grid, r = 3."""
    model = _model(preset="upstream", eval_dropout=False, cell=1)
    local, global_ = _bias(model.local[0]), _bias(model.globals[0])
    beyond = DISTANCE > 3
    assert torch.all(local[0][beyond] == float("-inf"))  # slope 0.25: exactly zero weight beyond r
    for h, m in enumerate(SLOPES4[1:], start=1):  # the others see every token, with a constant -100 m_h
        torch.testing.assert_close(local[h][beyond], torch.full_like(local[h][beyond], -100 * m), rtol=0, atol=1e-9)
    # keys (1,0) (1,1) (2,1) (2,2) (3,0) (0,3) (3,1): D = 1, 1.41, 2.24, 2.83, 3, 3, 3.16 -> floor 1, 1, 2, 2, 3, 3, far
    keys = [1, 8, 9, 16, 3, 21, 10]
    for h, m in enumerate(SLOPES4):
        far = float("-inf") if h == 0 else -100 * m
        expected = torch.tensor([-m, -m, -2 * m, -2 * m, -3 * m, -3 * m, far], dtype=torch.float64)
        torch.testing.assert_close(local[h, 0, keys], expected, rtol=0, atol=1e-9)
        clipped = torch.tensor([-m, -m, -2 * m, -2 * m, -3 * m, -3 * m, -100 * m], dtype=torch.float64)
        torch.testing.assert_close(global_[h, 0, keys], clipped, rtol=0, atol=1e-9)  # global: clipped ALiBi
    paper = _bias(_model(heads=4).globals[0])
    torch.testing.assert_close(paper, -torch.tensor(SLOPES4, dtype=torch.float64)[:, None, None] * DISTANCE,
                               rtol=0, atol=1e-9)  # paper: unclipped Euclidean


def test_coarse_cells_put_several_patches_in_one_cell():
    coords = torch.stack([torch.arange(8) * 224, torch.zeros(8, dtype=torch.long)], -1).unsqueeze(0)
    positions, _ = grid_positions(coords, torch.ones(1, 8, dtype=torch.bool), stride=224.0, cell=4)
    assert positions[0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # round(u / 4), half to even
    # the cell model on level-0 coordinates = the patch-grid model on the cell indices (same weights)
    coarse = _model(preset="upstream", eval_dropout=False, stride=224.0)
    fine = _model(preset="upstream", eval_dropout=False, cell=1)
    fine.load_state_dict(coarse.state_dict())
    level0 = GRID * 224
    cells, _ = grid_positions(level0, ALL, stride=224.0, cell=4)
    assert len(torch.unique(cells[0], dim=0)) == 9  # 49 patches in 3 x 3 cells
    x = torch.randn(1, 49, 6, dtype=torch.float64)
    torch.testing.assert_close(coarse(x, coords=level0).logits, fine(x, coords=cells).logits, rtol=0, atol=1e-12)
    assert not torch.allclose(coarse(x, coords=level0).logits, fine(x, coords=GRID).logits)
    shared = _bias(coarse.local[0], cells)  # tokens of one cell are at distance 0: the same weight as self
    same_cell = (cells[0, :, None] == cells[0, None]).all(-1)
    assert torch.all(shared[:, same_cell] == 0)


def test_eval_passes_differ_with_eval_dropout_and_repeat_under_a_seed():
    x = torch.randn(1, 49, 6, dtype=torch.float64)
    upstream = _model(preset="upstream")
    first, second = upstream(x, coords=GRID).logits, upstream(x, coords=GRID).logits
    assert not torch.equal(first, second)  # spec §3.5: dropout on at inference
    torch.manual_seed(1)
    first = upstream(x, coords=GRID).logits
    torch.manual_seed(1)
    assert torch.equal(upstream(x, coords=GRID).logits, first)  # masks from torch's global RNG
    off = _model(preset="upstream", eval_dropout=False)
    assert torch.equal(off(x, coords=GRID).logits, off(x, coords=GRID).logits)
    off.train()
    assert not torch.equal(off(x, coords=GRID).logits, off(x, coords=GRID).logits)  # training keeps its dropout


def _none(h, D):
    return torch.zeros((), dtype=torch.bool)


# option -> (the local entries it changes, the global entries it changes), as functions of (head, D); r = 3
_CHANGES = {
    "head_mask": ({"head_mask": "largest_slope"}, lambda h, D: (h > 0) & (D > 3), _none),
    "distance": ({"distance": "floor"}, lambda h, D: (D <= 3) & (D != D.floor()), lambda h, D: D != D.floor()),
    "global_alibi": ({"global_alibi": "clipped"}, _none, lambda h, D: D > 3),
    "cell": ({"cell": 4}, _none, _none),  # the attention given positions is unchanged; the positions move
}


@pytest.mark.parametrize("option", list(_CHANGES))
def test_each_option_alone_changes_exactly_its_behaviour(option):
    kwargs, local_changes, global_changes = _CHANGES[option]
    base, variant = _model(heads=4), _model(heads=4, **kwargs)
    heads = torch.arange(4)[:, None, None]
    for block, changes in ((0, local_changes), (None, global_changes)):
        a, b = ((m.local[0] if block == 0 else m.globals[0]) for m in (base, variant))
        differs = ~torch.isclose(_bias(a), _bias(b), rtol=0, atol=1e-12)
        assert torch.equal(differs, torch.broadcast_to(changes(heads, DISTANCE), differs.shape)), (option, block)
    level0 = GRID * 224
    moved = not torch.equal(grid_positions(level0, ALL, 224.0, base.cell)[0],
                            grid_positions(level0, ALL, 224.0, variant.cell)[0])
    assert moved == (option == "cell")


def test_eval_dropout_alone_only_changes_eval():
    x = torch.randn(1, 49, 6, dtype=torch.float64)
    base, variant = _model(attn_dropout=0.05), _model(attn_dropout=0.05, eval_dropout=True)
    assert torch.equal(base(x, coords=GRID).logits, base(x, coords=GRID).logits)
    assert not torch.equal(variant(x, coords=GRID).logits, variant(x, coords=GRID).logits)
    base.train(), variant.train()
    torch.manual_seed(2)
    trained = base(x, coords=GRID).logits
    torch.manual_seed(2)
    assert torch.equal(variant(x, coords=GRID).logits, trained)  # the same dropout draws in training


@pytest.mark.parametrize("kwargs,message", [
    ({"preset": "authors"}, "preset must be one of"),
    ({"head_mask": "smallest"}, "head_mask must be one of"),
    ({"distance": "manhattan"}, "distance must be one of"),
    ({"global_alibi": "soft"}, "global_alibi must be one of"),
    ({"cell": 0}, "cell must be an int >= 1"),
    ({"cell": 2.5}, "cell must be an int >= 1"),
    ({"heads": 0}, "heads must be an int >= 1"),
    ({"pool": "no"}, "pool must be True or False"),
    ({"eval_dropout": "yes"}, "eval_dropout must be True or False"),
    ({"attn_dropout": 1.0}, r"attn_dropout must be a number in \[0, 1\)"),
    ({"head_mask": "largest_slope", "alibi_local": False}, "head_mask='largest_slope' needs ALiBi"),
])
def test_bad_option_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("longmil", 6, 2, dim=16, **kwargs)
