"""Rank and sparsity measures of attention matrices (LongMIL spec §4.1, §2.5, §6.6-6.7): the measures equal their
formulas on matrices of known spectrum; the derived bounds hold on the attention types that spec §4.1 compares
(band rank >= n - b, full-grid local rank >= n - rW, logit rank <= d_h, 1 <= stable/effective rank <= rank,
k distinct tokens -> rank <= k, linear attention rank <= d_h, Nyström rank <= landmarks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from milstudy.analysis.attention_matrices import (
    attention_matrices,
    attention_matrix,
    parse_kind,
    random_projection,
    spatial_features,
)
from milstudy.analysis.attention_rank import (
    attention_sparsity_ratio,
    effective_rank,
    numerical_rank,
    rank_measures,
    rank_table,
    relative_rank,
    stable_rank,
)
from milstudy.data.synthetic.foreground import full_grid, irregular_foreground
from milstudy.models.layers import NystromAttention


def _known_spectrum(values, n=12, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.zeros(n)
    s[: len(values)] = values
    return u @ np.diag(s) @ v.T


def _qk(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)


def test_measures_equal_their_formulas_on_a_known_spectrum():
    a = _known_spectrum([4.0, 2.0, 1.0, 1e-4])
    assert numerical_rank(a) == 4
    assert relative_rank(a, 0.3) == 2 and relative_rank(a, 1e-2) == 3 and relative_rank(a, 1e-5) == 4
    p = np.array([4, 2, 1, 1e-4]) / 7.0001
    assert effective_rank(a) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
    assert stable_rank(a) == pytest.approx((16 + 4 + 1 + 1e-8) / 16, rel=1e-9)
    assert np.linalg.matrix_rank(a) == numerical_rank(a)


def test_uniform_and_identity_attention_are_the_extremes():
    n = 50
    uniform = np.full((n, n), 1.0 / n)
    row = rank_measures(uniform)
    assert row["numerical_rank"] == 1 and row["effective_rank"] == pytest.approx(1.0)
    assert row["stable_rank"] == pytest.approx(1.0) and row["sparsity"] == 0.0
    row = rank_measures(np.eye(n))
    assert row["numerical_rank"] == n and row["effective_rank"] == pytest.approx(n)
    assert row["stable_rank"] == pytest.approx(n) and row["sparsity"] == pytest.approx(1 - 1 / n)
    assert row["numerical_rank_frac"] == 1.0


KINDS = ["full", "local_r2", "local_r5", "alibi", "alibi_m1", "band_b3", "nystrom_m16", "linear"]


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_rank_orderings_hold_for_every_attention_type(temperature):
    positions = irregular_foreground(150, seed=3)
    features = spatial_features(positions, 16, seed=3)
    table = rank_table(attention_matrices(features, positions, KINDS, [temperature], head_dim=8, seed=1))
    assert len(table) == len(KINDS)
    assert (table["stable_rank"] >= 1 - 1e-9).all() and (table["effective_rank"] >= 1 - 1e-9).all()
    assert (table["stable_rank"] <= table["numerical_rank"] + 1e-9).all()
    assert (table["effective_rank"] <= table["numerical_rank"] + 1e-9).all()
    assert (table["rank_rel_0.01"] <= table["rank_rel_0.001"]).all()
    assert (table["rank_rel_0.001"] <= table["numerical_rank"]).all()
    assert (table["logit_rank"] <= 8).all()  # rank(QKᵀ) <= d_h (paper Eqs. 6-7)
    by_kind = table.set_index("kind")
    assert by_kind.loc["linear", "numerical_rank"] <= 8  # phi(Q) phi(K)ᵀ, normalised: rank <= d_h
    assert by_kind.loc["nystrom_m16", "numerical_rank"] <= 16  # k1 pinv(k2) k3: rank <= landmarks


@pytest.mark.parametrize("band", [3, 10])
def test_band_matrix_rank_is_at_least_n_minus_b(band):
    n = 128
    q, k = _qk(n, 8)
    a = attention_matrix(f"band_b{band}", q, k, torch.zeros(n, 2, dtype=torch.long)).numpy()
    i, j = np.indices(a.shape)
    assert np.all(a[np.abs(i - j) > band] == 0.0) and np.allclose(a.sum(1), 1.0)
    lower_left = a[band:, : n - band]  # paper Eq. 13: upper-triangular with a positive diagonal
    assert np.all(np.diag(lower_left) > 0) and np.all(np.tril(lower_left, -1) == 0)
    assert numerical_rank(a) >= n - band


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_local_mask_on_a_full_grid_has_rank_at_least_n_minus_r_w(radius):
    side = 16
    positions = torch.as_tensor(full_grid(side, side))
    q, k = _qk(side * side, 8, seed=radius)
    a = attention_matrix(f"local_r{radius}", q, k, positions).numpy()
    n, offset = side * side, radius * side  # spec §2.5: every kept pair has raster offset <= rW, and rW is kept
    i, j = np.indices(a.shape)
    assert np.all(a[np.abs(i - j) > offset] == 0.0)
    assert np.all(np.diag(a[offset:, : n - offset]) > 0)
    assert numerical_rank(a) >= n - offset


def test_local_attention_rows_sum_to_one_and_the_sparsity_counts_the_mask():
    positions = irregular_foreground(200, seed=5)
    q, k = _qk(200, 8, seed=5)
    a = attention_matrix("local_r3", q, k, torch.as_tensor(positions)).numpy()
    dist = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    assert np.allclose(a.sum(1), 1.0) and np.all(a[dist > 3] == 0.0) and np.all(np.diag(a) > 0)
    kept = np.count_nonzero(dist <= 3)
    assert attention_sparsity_ratio(a) >= 1 - kept / 200**2 - 1e-12  # spec §6.7
    assert attention_sparsity_ratio(np.full((200, 200), 1 / 200)) == 0.0


def test_few_distinct_tokens_give_low_rank_full_attention():
    positions = full_grid(10, 10)
    base = np.random.default_rng(0).standard_normal((4, 16))
    features = base[np.arange(100) % 4]  # 4 distinct tokens -> at most 4 distinct rows and columns
    table = rank_table(attention_matrices(features, positions, ["full", "alibi_m1", "local_r2"], head_dim=16))
    by_kind = table.set_index("kind")
    assert by_kind.loc["full", "numerical_rank"] <= 4
    assert by_kind.loc["full", "logit_rank"] <= 4
    assert by_kind.loc["alibi_m1", "numerical_rank"] > 4 and by_kind.loc["local_r2", "numerical_rank"] > 4


def test_high_temperature_full_attention_tends_to_uniform_and_alibi_without_slope_is_full():
    q, k = _qk(60, 8)
    pos = torch.as_tensor(full_grid(6, 10))
    hot = attention_matrix("full", q, k, pos, temperature=1e6).numpy()
    assert effective_rank(hot) < 1.01 and relative_rank(hot, 1e-3) == 1
    np.testing.assert_allclose(attention_matrix("alibi_m0", q, k, pos).numpy(),
                               attention_matrix("full", q, k, pos).numpy(), rtol=0, atol=1e-14)


def test_nystrom_matrix_is_the_zoo_layer():
    torch.manual_seed(0)
    n, dim, m = 37, 16, 8  # 37 tokens: 3 front zero-padding rows, like the layer
    layer = NystromAttention(dim, heads=1, dim_head=dim, landmarks=m, dropout=0.0).double()
    with torch.no_grad():
        layer.residual_conv.weight.zero_()
        layer.to_out[0].weight.copy_(torch.eye(dim))
        layer.to_out[0].bias.zero_()
    x = torch.randn(1, n, dim, dtype=torch.float64)
    w_q, w_k, w_v = layer.to_qkv.weight.chunk(3, dim=0)
    q, k, v = x[0] @ w_q.T, x[0] @ w_k.T, x[0] @ w_v.T
    a = attention_matrix(f"nystrom_m{m}", q.detach(), k.detach(), torch.zeros(n, 2, dtype=torch.long))
    torch.testing.assert_close(a @ v, layer(x)[0], rtol=0, atol=1e-10)


def test_a_given_projection_is_used_and_records_are_in_raster_order():
    positions = irregular_foreground(80, seed=2)[::-1].copy()  # reversed: the builder must re-sort
    features = spatial_features(positions, 6, seed=2)
    w = random_projection(6, 4, seed=9)
    records = attention_matrices(features, positions, ["full"], projection=w)
    records_callable = attention_matrices(features, positions, ["full"], projection=lambda x: (x @ w[0], x @ w[1]))
    np.testing.assert_allclose(records[0]["attention"], records_callable[0]["attention"])
    ordered = features[::-1]
    expected = torch.softmax(torch.as_tensor((ordered @ w[0]) @ (ordered @ w[1]).T / 2.0), -1).numpy()
    np.testing.assert_allclose(records[0]["attention"], expected, rtol=0, atol=1e-12)


def test_bad_parameters_are_named():
    for label, word in (("locl_r3", "not understood"), ("full3", "takes no number"), ("band_b2.5", "integer")):
        with pytest.raises(ValueError, match=word):
            parse_kind(label)
    assert parse_kind("local_r10").parameter == 10.0 and parse_kind("alibi").parameter == 2.0**-8
    with pytest.raises(ValueError, match="delta"):
        relative_rank(np.eye(3), 1.5)
    with pytest.raises(ValueError, match="square"):
        attention_sparsity_ratio(np.ones((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        rank_measures(np.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        attention_matrix("full", *_qk(4, 2), torch.zeros(4, 2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="projection"):
        attention_matrices(np.ones((5, 3)), full_grid(1, 5), ["full"], projection=(np.ones((4, 2)), np.ones((4, 2))))
