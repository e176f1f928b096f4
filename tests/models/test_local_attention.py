"""2-D local attention (LongMIL, specs/longmil.md §2.3-2.4, §6): the tiled kernel equals the dense masked oracle,
forward and backward, on irregular foregrounds in any order; every head is masked beyond r (the upstream min() bug);
distance = r is kept; the global layer's query-chunked ALiBi attention equals dense; no N x N tensor is built."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from milstudy.models import dense_local_attention_2d, full_attention_2d_alibi, local_attention_2d


def _foreground(n: int, side: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)])
    coords = torch.stack([coords % side, coords // side], dim=-1)  # [B, N, 2], holes and shuffled order
    mask = torch.rand(batch, n, generator=gen) > 0.15
    return coords, mask


def _qkv(batch, heads, n, d, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3)]


SLOPES4 = torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8], dtype=torch.float64)


@pytest.mark.parametrize("radius,tile,heads,with_slopes", [(1, 2, 1, False), (3, 4, 4, True), (10, 8, 4, True),
                                                          (10, 16, 1, False)])
def test_tiled_equals_dense_forward_and_backward_float64(radius, tile, heads, with_slopes):
    coords, mask = _foreground(300, 30)
    q, k, v = _qkv(2, heads, 300, 8, torch.float64)
    slopes = SLOPES4[:heads] if with_slopes else None
    fast = local_attention_2d(q, k, v, coords, radius, slopes, mask, tile=tile, chunk_elems=4096)
    dense = dense_local_attention_2d(q, k, v, coords, radius, slopes, mask)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-10)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (q, k, v))
    grads_dense = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_float32_matches_to_1e5_and_full_alibi_layer_equals_dense():
    coords, mask = _foreground(200, 20)
    q, k, v = _qkv(2, 4, 200, 16, torch.float32)
    slopes = SLOPES4.float()
    torch.testing.assert_close(local_attention_2d(q, k, v, coords, 3, slopes, mask),
                               dense_local_attention_2d(q, k, v, coords, 3, slopes, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(full_attention_2d_alibi(q, k, v, coords, slopes, mask, chunk=37),
                               dense_local_attention_2d(q, k, v, coords, None, slopes, mask), rtol=0, atol=1e-5)


def test_every_head_is_masked_beyond_the_radius_and_distance_r_is_kept():
    # 3 tokens on a line: 0 at x=0, 1 at x=2 (distance 2 = r), 2 at x=3 (distance 3 > r); value = one-hot of the key
    coords = torch.tensor([[[0, 0], [2, 0], [3, 0]]])
    q = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.eye(3, dtype=torch.float64).expand(1, 4, 3, 3)
    out = local_attention_2d(q, k, v, coords, 2, SLOPES4)
    for head in range(4):  # every head, not only the largest-slope one (upstream bug)
        assert out[0, head, 0, 2] == 0.0  # beyond r: no weight
        assert out[0, head, 0, 1] > 0.0   # exactly r: kept
        expected = torch.softmax(torch.tensor([0.0, -2 * SLOPES4[head]]), 0)  # ALiBi -m_h * distance
        torch.testing.assert_close(out[0, head, 0, :2], expected.double(), rtol=0, atol=1e-12)


def test_a_query_without_neighbours_attends_to_itself():
    coords = torch.tensor([[[0, 0], [50, 50]]])
    q, k, v = _qkv(1, 1, 2, 4, torch.float64)
    out = local_attention_2d(q, k, v, coords, 3)
    torch.testing.assert_close(out, v.detach(), rtol=0, atol=1e-12)


def test_bad_input_names_the_argument():
    coords, _ = _foreground(10, 5, batch=1)
    q, k, v = _qkv(1, 2, 10, 4, torch.float64)
    with pytest.raises(ValueError, match="radius"):
        local_attention_2d(q, k, v, coords, -1)
    with pytest.raises(ValueError, match="slopes"):
        local_attention_2d(q, k, v, coords, 2, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="coords"):
        local_attention_2d(q, k, v, coords.float() + 0.5, 2)


class _NoQuadratic(TorchDispatchMode):
    """Fails on any intermediate tensor with more than ``limit`` elements (the memory-linearity check)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                if tensor.numel() > self.limit:
                    raise AssertionError(f"{func}: intermediate of {tensor.numel()} elements > {self.limit}")
        return out


def test_no_n_by_n_tensor_in_forward_or_backward_and_the_oracle_would_trip_the_check():
    n = 3000
    coords, _ = _foreground(n, 70, batch=1)
    q, k, v = _qkv(1, 1, n, 8, torch.float32)
    limit = 400 * n  # << n * n = 9e6
    with _NoQuadratic(limit):
        out = local_attention_2d(q, k, v, coords, 5, chunk_elems=2 ** 16)
        out.sum().backward()
    with pytest.raises(AssertionError, match="intermediate"):
        with _NoQuadratic(limit):
            dense_local_attention_2d(q, k, v, coords, 5)
    assert math.isfinite(float(q.grad.abs().sum()))


@pytest.mark.parametrize("radius,tile", [(3, 4), (10, 8), (10, None)])
def test_pair_counts_are_exact_and_the_padding_is_counted(radius, tile):
    from milstudy.models.local_attention import local_attention_pairs

    coords, _ = _foreground(500, 30, batch=1)
    stats = local_attention_pairs(coords[0], radius, tile=tile, chunk_elems=4096)
    diff = coords[0][:, None, :] - coords[0][None, :, :]
    assert stats["useful"] == int(((diff * diff).sum(-1) <= radius * radius).sum())  # self pairs included
    assert stats["computed"] >= stats["useful"] and stats["computed_over_useful"] >= 1.0
    assert stats["tile"] == (tile or 8) and stats["chunks"] >= 1
    with pytest.raises(ValueError, match="coords"):
        local_attention_pairs(coords, radius)


# ------------------------------------------------------------------ spec §3 variants (LongMIL preset="upstream")
def test_floor_distances_with_shared_cells_tiled_and_chunked_equal_dense():
    coords, mask = _foreground(300, 30)
    coords = torch.div(coords, 3, rounding_mode="floor")  # coarse cells: several tokens share a position
    q, k, v = _qkv(2, 4, 300, 8, torch.float64)
    dense = dense_local_attention_2d(q, k, v, coords, 3, SLOPES4, mask, distance="floor")
    for fast in (local_attention_2d(q, k, v, coords, 3, SLOPES4, mask, tile=4, chunk_elems=4096, distance="floor"),
                 full_attention_2d_alibi(q, k, v, coords, SLOPES4, mask, chunk=37, radius=3, distance="floor")):
        torch.testing.assert_close(fast, dense, rtol=0, atol=1e-10)
        weights = torch.randn_like(fast)
        for a, b in zip(torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                        torch.autograd.grad((dense * weights).sum(), (q, k, v), retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert not torch.allclose(dense, dense_local_attention_2d(q, k, v, coords, 3, SLOPES4, mask))


def test_a_per_head_bias_beyond_the_radius_in_the_chunked_path_equals_dense():
    coords, mask = _foreground(200, 20)
    q, k, v = _qkv(2, 4, 200, 8, torch.float64)
    beyond = torch.tensor([float("-inf"), -6.25, -1.5625, -0.390625], dtype=torch.float64)
    fast = full_attention_2d_alibi(q, k, v, coords, SLOPES4, mask, chunk=29, radius=3, beyond=beyond)
    dense = dense_local_attention_2d(q, k, v, coords, 3, SLOPES4, mask, beyond=beyond)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-10)
    weights = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                    torch.autograd.grad((dense * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    masked = dense_local_attention_2d(q, k, v, coords, 3, SLOPES4, mask)
    torch.testing.assert_close(dense[:, 0], masked[:, 0], rtol=0, atol=1e-12)  # -inf: that head stays local
    assert not torch.allclose(dense[:, 1:], masked[:, 1:])


@pytest.mark.parametrize("kernel", ["tiled", "chunked"])
def test_attention_dropout_drops_weights_reproducibly_and_its_gradient_is_exact(kernel):
    coords, mask = _foreground(60, 10, batch=1)
    n, p = 60, 0.3
    q, k, _ = _qkv(1, 2, n, 4, torch.float64)
    eye = torch.eye(n, dtype=torch.float64).expand(1, 2, n, n)  # values = one-hot keys: the output is the matrix

    def attend(q, k, v, seed=7, dropout=p):
        if kernel == "tiled":
            return local_attention_2d(q, k, v, coords, 3, SLOPES4[:2], mask, tile=2, chunk_elems=512,
                                      dropout=dropout, dropout_seed=seed)
        return full_attention_2d_alibi(q, k, v, coords, SLOPES4[:2], mask, chunk=16, dropout=dropout,
                                       dropout_seed=seed)

    plain, dropped = attend(q, k, eye, dropout=0.0), attend(q, k, eye)
    kept = dropped != 0
    positive = plain > 0
    torch.testing.assert_close(dropped[kept], plain[kept] / (1 - p), rtol=1e-12, atol=0)
    assert not torch.any(kept & ~positive) and 0.2 < 1 - kept[positive].double().mean() < 0.4
    assert torch.equal(attend(q, k, eye), dropped) and not torch.equal(attend(q, k, eye, seed=8), dropped)
    torch.manual_seed(0)
    unseeded = attend(q, k, eye, seed=None)
    torch.manual_seed(0)
    assert torch.equal(attend(q, k, eye, seed=None), unseeded)  # default seed: from torch's global RNG
    v = torch.randn(1, 2, n, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v), (q, k, v))


def test_variant_options_are_checked_by_name():
    coords, mask = _foreground(20, 6, batch=1)
    q, k, v = _qkv(1, 2, 20, 4, torch.float64)
    with pytest.raises(ValueError, match="distance must be one of"):
        local_attention_2d(q, k, v, coords, 2, None, mask, distance="manhattan")
    with pytest.raises(ValueError, match="dropout must be a number"):
        full_attention_2d_alibi(q, k, v, coords, None, mask, dropout=1.0)
    with pytest.raises(ValueError, match="dropout_seed must be"):
        local_attention_2d(q, k, v, coords, 2, None, mask, dropout=0.1, dropout_seed=-1)
    with pytest.raises(ValueError, match="needs a radius"):
        full_attention_2d_alibi(q, k, v, coords, None, mask, beyond=[-1.0, -1.0])
    with pytest.raises(ValueError, match=r"beyond must be \[h\]"):
        full_attention_2d_alibi(q, k, v, coords, None, mask, radius=2, beyond=[-1.0])


def test_soft_masks_and_dropout_in_the_chunked_path_build_no_n_by_n_tensor():
    n = 2000
    coords, _ = _foreground(n, 60, batch=1)
    q, k, v = _qkv(1, 4, n, 8, torch.float32)
    beyond = torch.tensor([float("-inf"), -6.25, -1.5625, -0.390625])
    with _NoQuadratic(n * n // 2):  # per chunk: h * 64 * n = n^2 / 8
        out = full_attention_2d_alibi(q, k, v, coords, SLOPES4.float(), chunk=64, radius=10, beyond=beyond,
                                      distance="floor", dropout=0.05)
        out.sum().backward()
    assert math.isfinite(float(q.grad.abs().sum()))
