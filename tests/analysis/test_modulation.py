"""Modulation factor Λ of Eq. 17 (spec abmilx invariants 9 and 10)."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from milstudy.analysis.modulation import (
    cohort_modulation,
    eq17_identity_residual,
    lambda_share,
    modulation_factor,
    modulation_from_model,
)
from milstudy.models.base import MILOutput


def test_eq17_identity_holds_to_1e12_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.normal(0, 3, size=(4, 64))
        delta = rng.normal(0, 3, size=(4, 64))
        assert eq17_identity_residual(a, delta) < 1e-12


def test_lambda_equals_ratio_of_refined_to_original_attention():
    rng = np.random.default_rng(1)
    a, delta = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    y = (rng.random(20) < 0.3).astype(int)
    y[0] = 1
    table = modulation_factor(a, delta, y)
    for head, row in table.iterrows():
        i = row["noise_index"]
        assert y[i] == 0
        assert softmax(a[head])[i] == pytest.approx(softmax(a[head])[y == 0].max())
        assert row["lambda"] == pytest.approx(softmax(a[head] + delta[head])[i] / softmax(a[head])[i], rel=1e-10)


def test_jensen_eq19_and_sufficient_condition():
    rng = np.random.default_rng(2)
    for _ in range(100):
        a, delta = rng.normal(0, 2, 30), rng.normal(0, 2, 30)
        a_hat = softmax(a)
        assert a_hat @ np.exp(delta) >= np.exp(a_hat @ delta) * (1 - 1e-12)
        y = np.zeros(30, dtype=int)
        y[:5] = 1
        row = modulation_factor(a, delta, y).iloc[0]
        if row["jensen_condition"]:
            assert row["lambda_le_1"] and row["attn_after"] <= row["attn_before"] + 1e-15


def test_constructed_cases_with_lambda_below_and_above_one():
    # 2 tumour (0, 1), 2 noise (2, 3); A+ raises the tumour logits -> the top noise patch loses attention
    a = np.array([1.0, 1.0, 0.5, 0.0])
    y = np.array([1, 1, 0, 0])
    down = modulation_factor(a, np.array([2.0, 2.0, 0.0, 0.0]), y).iloc[0]
    assert down["noise_index"] == 2
    # Λ = e^0 / Σ â e^Δ with â = softmax(a)
    a_hat = softmax(a)
    assert down["lambda"] == pytest.approx(1 / (a_hat @ np.exp([2.0, 2.0, 0.0, 0.0])))
    assert down["lambda"] < 1 and down["lambda_le_1"] and down["jensen_condition"]
    # A+ raises the top noise patch instead -> Λ > 1
    up = modulation_factor(a, np.array([0.0, 0.0, 2.0, 0.0]), y).iloc[0]
    assert up["lambda"] > 1 and not up["lambda_le_1"] and not up["jensen_condition"]


def test_lambda_share_split_by_alpha_sign():
    a = np.array([[1.0, 1.0, 0.5, 0.0]])
    y = np.array([1, 1, 0, 0])
    down, up = np.array([[2.0, 2.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 2.0, 0.0]])
    table = cohort_modulation([a, a, a], [down, up, down], [y, y, y], alpha=[0.5, 0.5, -1.0])
    share = lambda_share(table).set_index("alpha_sign")
    assert share.loc["all", "share_lambda_le_1"] == pytest.approx(2 / 3)
    assert share.loc["alpha>0", "share_lambda_le_1"] == pytest.approx(0.5)
    assert share.loc["alpha<0", "pairs"] == 1


class _ToyABMILX(torch.nn.Module):
    """A 2-head model with the ABMILX extras: logits a = X w, Δ = α U a with U = row-softmax(X Xᵀ)."""

    def __init__(self, store_refined: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
        self.alpha = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.store_refined = store_refined

    def forward(self, x, coords=None, mask=None):
        a = (x @ self.w).transpose(1, 2)  # [B, heads, N]
        u = torch.softmax(x @ x.transpose(1, 2), dim=-1)  # [B, N, N]
        delta = self.alpha * a @ u.transpose(1, 2)
        attention = torch.softmax(a + delta, dim=-1)
        stored = a + delta if self.store_refined else delta
        return MILOutput(logits=x.mean(1)[:, :1], attention=attention,
                         extras={"local_logits": a, "attn_plus_delta": stored})


@pytest.mark.parametrize("store_refined", [False, True])
def test_modulation_from_model_reads_the_extras(store_refined):
    torch.manual_seed(0)
    model = _ToyABMILX(store_refined)
    x = torch.randn(12, 4, dtype=torch.float64)
    y = np.zeros(12, dtype=int)
    y[:3] = 1
    table = modulation_from_model(model, x, y)
    assert list(table["head"]) == [0, 1]
    assert table["alpha"].tolist() == pytest.approx([0.7, 0.7])
    out = model(x[None])
    attention = out.attention[0].detach().numpy()
    for head, row in table.iterrows():
        assert row["attn_after"] == pytest.approx(attention[head, row["noise_index"]], rel=1e-9)


def test_model_without_extras_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, coords=None, mask=None):
            return MILOutput(logits=x.mean(1), attention=torch.full(x.shape[:2], 1 / x.shape[1])[:, None])

    with pytest.raises(KeyError, match="local_logits"):
        modulation_from_model(Plain(), torch.randn(5, 3), np.array([1, 0, 0, 0, 0]))


def test_eq17_holds_on_the_abmilx_model_internals():
    from milstudy.analysis.modulation import eq17_model_residual
    from milstudy.models import build_model

    torch.manual_seed(0)
    model = build_model("abmilx", 12, 2, dim=16, heads=4, alpha_init=0.8)
    assert eq17_model_residual(model, torch.randn(30, 12)) < 1e-12
    table = modulation_from_model(model, torch.randn(30, 12), (np.arange(30) < 4).astype(int))
    assert len(table) == 4 and table["alpha"].tolist() == pytest.approx([0.8] * 4)
