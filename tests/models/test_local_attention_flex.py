"""The FlexAttention backend (``backend="flex"``, milstudy.models.local_attention_flex): on CPU PyTorch runs its
forward only (eager, N x N scores), so these tests check what CPU can: the output equals the dense oracle for
local and full ALiBi attention on irregular, shuffled, padded foregrounds; the block mask drops no pair within r;
the Morton order is a permutation with padding last; the variants and training on CPU are refused by name.
The compiled CUDA kernel and its backward are checked by ``python -m milstudy.bench.cuda_check`` on a GPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from milstudy.models import dense_local_attention_2d, full_attention_2d_alibi, local_attention_2d
from milstudy.models.local_attention_flex import block_keep, morton_order

SLOPES4 = [2 ** -2, 2 ** -4, 2 ** -6, 0.0]


def _foreground(n: int, side: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)])
    coords = torch.stack([cells % side, cells // side], dim=-1)  # holes, shuffled order
    mask = torch.rand(batch, n, generator=gen) > 0.15
    mask[1, -40:] = False  # a padded tail, as in a batch of unequal bags
    return coords, mask


def _qkv(batch, heads, n, d, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.fixture(autouse=True)
def _quiet():  # eager FlexAttention warns that it is slow; that is expected here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("radius,heads,with_slopes", [(1, 1, False), (3, 4, True), (10, 4, True), (10, 1, False)])
def test_flex_local_attention_equals_the_dense_oracle_float64(radius, heads, with_slopes):
    coords, mask = _foreground(300, 24)  # 300 tokens: three blocks of 128, the last one part padding
    q, k, v = _qkv(2, heads, 300, 8, torch.float64)
    slopes = torch.tensor(SLOPES4[:heads], dtype=torch.float64) if with_slopes else None
    with torch.no_grad():
        got = local_attention_2d(q, k, v, coords, radius, slopes, mask, backend="flex")
        want = dense_local_attention_2d(q, k, v, coords, radius, slopes, mask)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.all(got[~mask[:, None, :, None].expand_as(got)] == 0)  # padded query rows are exactly 0


def test_flex_full_alibi_and_float32_equal_dense():
    coords, mask = _foreground(200, 20)
    q, k, v = _qkv(2, 4, 200, 16, torch.float32)
    slopes = torch.tensor(SLOPES4)
    with torch.no_grad():
        full = full_attention_2d_alibi(q, k, v, coords, slopes, mask, backend="flex")
        local = local_attention_2d(q, k, v, coords, 5, slopes, mask, backend="flex")
        assert torch.allclose(full, dense_local_attention_2d(q, k, v, coords, None, slopes, mask), atol=1e-5)
        assert torch.allclose(local, dense_local_attention_2d(q, k, v, coords, 5, slopes, mask), atol=1e-5)
        assert torch.allclose(local, local_attention_2d(q, k, v, coords, 5, slopes, mask), atol=1e-5)  # = tiled


@pytest.mark.parametrize("radius,block", [(1, 16), (4, 32), (10, 128)])
def test_the_block_mask_keeps_every_pair_within_the_radius(radius, block):
    n, side = 512, 27
    gen = torch.Generator().manual_seed(3)
    cells = torch.randperm(side * side, generator=gen)[:n]
    positions = torch.stack([cells % side, cells // side], dim=-1)
    valid = torch.rand(n, generator=gen) > 0.1
    order = morton_order(positions, valid)
    pos, ok = positions[order], valid[order]
    keep = block_keep(pos[None], ok[None], radius, block)[0]
    diff = pos[:, None, :] - pos[None, :, :]
    within = ((diff * diff).sum(-1) <= math.floor(radius * radius)) & ok[:, None] & ok[None, :]
    blocks = torch.arange(n) // block
    assert torch.all(keep[blocks[:, None], blocks[None, :]][within])  # no needed pair pruned
    if radius == 1:  # and at a small radius most block pairs are pruned
        assert keep.float().mean() < 0.5


def test_morton_order_is_a_permutation_with_padding_last_and_neighbours_close():
    side = 16
    positions = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    valid = torch.ones(len(positions), dtype=torch.bool)
    valid[::7] = False
    order = morton_order(positions[torch.randperm(len(positions))], valid)
    assert sorted(order.tolist()) == list(range(len(positions)))
    assert not bool(valid[order][valid.sum():].any())  # padding last
    full = morton_order(positions, torch.ones(len(positions), dtype=torch.bool))
    first = positions[full[:16]]  # on a full grid the first 16 Morton codes are the 4 x 4 corner square
    assert int(first.max()) == 3


def test_flex_refuses_the_upstream_variants_and_training_on_cpu():
    coords, mask = _foreground(64, 10)
    q, k, v = _qkv(2, 1, 64, 8, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        local_attention_2d(q, k, v, coords, 3, backend="triton")
    with pytest.raises(ValueError, match="distance='euclidean'"):
        local_attention_2d(q, k, v, coords, 3, distance="floor", backend="flex")
    with pytest.raises(ValueError, match="dropout"):
        full_attention_2d_alibi(q, k, v, coords, None, dropout=0.1, backend="flex")
    with pytest.raises(ValueError, match="beyond"):
        full_attention_2d_alibi(q, k, v, coords, [0.5], radius=3, beyond=[-1.0], backend="flex")
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        local_attention_2d(q, k, v, coords, 3, backend="flex")


def test_longmil_with_the_flex_backend_gives_the_torch_backend_logits_and_refuses_upstream_variants():
    from milstudy.models import build_model

    torch.manual_seed(0)
    coords, mask = _foreground(150, 16)
    x = torch.randn(2, 150, 12)
    models = {backend: build_model("longmil", in_dim=12, n_out=2, dim=32, radius=3.0, attention_backend=backend)
              for backend in ("torch", "flex")}
    models["flex"].load_state_dict(models["torch"].state_dict())
    with torch.no_grad():
        logits = {name: model.eval()(x, coords=coords.double(), mask=mask).logits for name, model in models.items()}
    assert torch.allclose(logits["flex"], logits["torch"], atol=1e-5)
    with pytest.raises(ValueError, match="attention_backend='torch'"):
        build_model("longmil", in_dim=12, n_out=2, preset="upstream", attention_backend="flex")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        build_model("longmil", in_dim=12, n_out=2, attention_backend="cuda")
