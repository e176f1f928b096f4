"""LongMIL (specs/longmil.md §2.2-2.3, §6): slopes, grid positions, 2 x 2 pooling, locality, invariances."""

from __future__ import annotations

import pytest
import torch

from milstudy.models import build_model
from milstudy.models.longmil import _Block, alibi_slopes, grid_positions, pool_2x2


def test_alibi_slopes_follow_the_press_schedule():
    assert alibi_slopes(1) == [2 ** -8]
    assert alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625]
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]  # spec §6.5
    with pytest.raises(ValueError, match="need >= 1 head"):
        alibi_slopes(0)


def test_grid_positions_from_level0_coordinates_with_given_or_inferred_stride():
    coords = torch.tensor([[[1000, 500], [1512, 500], [1000, 1524], [0, 0]]])  # last token is padding
    mask = torch.tensor([[True, True, True, False]])
    positions, strides = grid_positions(coords, mask)  # smallest step between distinct x or y values: 512
    assert positions[0, :3].tolist() == [[0, 0], [1, 0], [0, 2]] and strides.tolist() == [512.0]
    positions, strides = grid_positions(coords, mask, stride=256.0)  # the bag's own patch stride
    assert positions[0, :3].tolist() == [[0, 0], [2, 0], [0, 4]] and positions[0, 3].tolist() == [0, 0]
    with pytest.raises(ValueError, match="position-aware and needs patch coordinates"):
        grid_positions(None, mask)


def test_pooling_counts_cells_and_keeps_the_token_weighted_mean():
    full = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(4), indexing="xy"), -1).reshape(1, -1, 2)
    x = torch.randn(1, 24, 5, dtype=torch.float64)
    pooled, cells, mask = pool_2x2(x, full, torch.ones(1, 24, dtype=torch.bool))
    assert pooled.shape == (1, 6, 5) and mask.all()  # a full 6 x 4 grid -> 3 x 2 cells (spec §6.10)
    irregular = torch.tensor([[[0, 0], [1, 1], [2, 0], [5, 5], [4, 4], [9, 0]]])
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    pooled, cells, mask = pool_2x2(x, irregular, torch.ones(1, 6, dtype=torch.bool))
    counts = torch.tensor([2.0, 1.0, 2.0, 1.0], dtype=torch.float64)  # cells (0,0) (1,0) (2,2) (4,0), sorted
    assert cells[0].tolist() == [[0, 0], [1, 0], [2, 2], [4, 0]]
    torch.testing.assert_close((pooled[0] * counts[:, None]).sum(0) / counts.sum(), x[0].mean(0))


def test_a_local_block_never_looks_beyond_its_radius():
    torch.manual_seed(0)
    block = _Block(8, 2, 2.0, 4.0, True, 1.0, 0.0).double().eval()
    positions = torch.tensor([[[0, 0], [1, 0], [2, 1], [9, 9], [3, 3]]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    moved = x.clone()
    moved[0, 3] += 3.0 * torch.randn(8, dtype=torch.float64)  # the token at (9, 9) is farther than 2 from every other token
    out, out_moved = block(x, positions, mask), block(moved, positions, mask)
    torch.testing.assert_close(out_moved[0, [0, 1, 2, 4]], out[0, [0, 1, 2, 4]], atol=1e-12, rtol=0)
    near = x.clone()
    near[0, 1] += 3.0 * torch.randn(8, dtype=torch.float64)  # (1, 0) is within 2 of (0, 0) and (2, 1)
    assert not torch.allclose(block(near, positions, mask)[0, 0], out[0, 0])


def test_permuting_tokens_with_their_coordinates_keeps_the_logits_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = build_model("longmil", 6, 3, dim=16, radius=3.0).double().eval()
    n = 40
    coords = torch.stack([torch.arange(n) % 7, torch.arange(n) // 7], -1).unsqueeze(0) * 256
    x = torch.randn(1, n, 6, dtype=torch.float64)
    perm = torch.randperm(n)
    out = model(x, coords=coords)
    torch.testing.assert_close(model(x[:, perm], coords=coords[:, perm]).logits, out.logits, atol=1e-10, rtol=0)
    assert torch.equal(model(x, coords=coords).logits, out.logits)  # spec §6.9: no dropout at inference
    assert out.attention is None and out.extras["grid_stride"].tolist() == [256.0]
    with pytest.raises(ValueError, match="needs patch coordinates"):
        model(x)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="not divisible by heads"):
        build_model("longmil", 6, 2, dim=10, heads=4)
    with pytest.raises(ValueError, match="radius and layer counts"):
        build_model("longmil", 6, 2, radius=-1.0)


def test_2d_rope_scores_depend_only_on_the_position_difference():
    """spec §6.11: <R_p q, R_p' k> is a function of p - p' (random shifts of both positions)."""
    from milstudy.models.longmil_baselines import rope_2d

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    p, p2 = torch.tensor([[[3, 7]]]), torch.tensor([[[10, 2]]])
    score = (rope_2d(q, p) * rope_2d(k, p2)).sum()
    for shift in ([5, -4], [100, 31], [-3, 0]):
        s = torch.tensor(shift)
        torch.testing.assert_close((rope_2d(q, p + s) * rope_2d(k, p2 + s)).sum(), score, atol=1e-10, rtol=0)
    assert not torch.isclose((rope_2d(q, p) * rope_2d(k, p2 + torch.tensor([1, 0]))).sum(), score)


def test_absolute_position_embedding_clamps_beyond_its_table_and_says_so():
    torch.manual_seed(0)
    model = build_model("abs_pe_mil", 4, 2, dim=8, max_position=4).double().eval()
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    inside = torch.tensor([[[0, 0], [256, 0], [768, 0]]])
    beyond = torch.tensor([[[0, 0], [256, 0], [2560, 0]]])  # column 10 clamps to 3, the same as column 3
    out, clamped = model(x, coords=inside), model(x, coords=beyond)
    torch.testing.assert_close(clamped.logits, out.logits)
    assert float(out.extras["clamped_share"]) == 0.0 and float(clamped.extras["clamped_share"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["longmil", "fsa_rope"])
def test_record_attention_gives_each_blocks_exact_attention_matrix(name):
    """The recorded matrices are those the forward pass applies: rows sum to 1, local layers are zero beyond the
    radius, and attention @ values is the block's output (checked by re-running one block by hand)."""
    from milstudy.models.longmil import record_attention

    torch.manual_seed(0)
    kwargs = {"dim": 16, "radius": 2.0, "stride": 1.0} if name == "longmil" else {"dim": 16, "stride": 1.0}
    model = build_model(name, 8, 2, **kwargs).double().eval()
    grid = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(5), indexing="xy"), -1).reshape(1, -1, 2)
    x = torch.randn(1, 35, 8, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x, coords=grid).logits
        with record_attention(model) as records:
            recorded = model(x, coords=grid).logits
    torch.testing.assert_close(recorded, plain)  # recording does not change the forward pass
    expected = ["local", "local", "global"] if name == "longmil" else ["full", "full"]
    assert [r["type"] for r in records] == expected and [r["layer"] for r in records] == list(range(len(expected)))
    for record in records:
        attention = record["attention"]
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1], dtype=torch.float64))
    first = records[0]["attention"][0, 0]
    assert first.shape == (35, 35)
    if name == "longmil":
        distance = torch.cdist(grid[0].double(), grid[0].double())
        assert torch.all(first[distance > 2.0] == 0) and torch.all(first[distance <= 2.0] > 0)
        assert records[2]["attention"].shape[-1] == 12  # the global layer after 2 x 2 pooling: 4 x 3 cells
    block = next(m for m in model.modules() if isinstance(m, _Block))
    assert "attend" not in vars(block)  # the recording is removed on exit
    h = model.project(x)
    q, k, v = block.qkv(block.norm1(h)).view(1, 35, 3, 1, 16).permute(2, 0, 3, 1, 4)
    positions, _ = grid_positions(grid, torch.ones(1, 35, dtype=torch.bool), 1.0)
    torch.testing.assert_close(records[0]["attention"] @ v, block.attend(q, k, v, positions,
                                                                         torch.ones(1, 35, dtype=torch.bool)))
    with pytest.raises(ValueError, match="max_tokens"):
        with record_attention(model, max_tokens=10):
            model(x, coords=grid)
