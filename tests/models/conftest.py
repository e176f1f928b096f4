"""Shared toy MIL data for the model-zoo tests: a bag is positive iff it holds one key instance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milstudy.models import build_model, combined_loss

IN_DIM = 16

# Size overrides for the zoo-wide tests. TransMIL's default 256 landmarks pad every tiny test bag to 256 tokens
# and invert 256 x 256 kernels per head (seconds per call on 2 cores); dim=64 gives 32 landmarks, same code path.
# RRTMIL: upstream's 8 regions per side give every bag of <= 64 instances one-token regions (R-MSA's softmax over
# one key and CR-MSA's min-max are then constant, so q/k, EPEG and phi get no gradient); 2 regions give the toy bags
# multi-token regions, same code path.
TEST_KWARGS: dict[str, dict] = {"transmil": {"dim": 64}, "vitmil": {"dim": 64}, "qamil": {"dim": 64},
                                "transmil_anchor": {"dim": 64}, "transmil_anchor_nsf": {"dim": 64},
                                "rrtmil": {"dim": 64, "regions": 2, "crmsa_regions": 2},
                                "longmil": {"dim": 32, "radius": 2.0}, "fsa_rope": {"dim": 32},
                                "abs_pe_mil": {"dim": 32}}


def make_toy_bags(n_bags: int, n_instances: int = 10, dim: int = IN_DIM, seed: int = 0):
    """Bags ``[n_bags, n_instances, dim]`` of N(0, I) instances; every other bag has one key instance
    (mean +3 on channels 0-3 and -3 on channels 4-7, noise 0.5) at a random position. The key differs from the
    background in direction, not only in norm, so models with an input LayerNorm can see it too.
    Returns (x, labels long[n_bags])."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_bags, n_instances, dim, generator=gen)
    labels = torch.arange(n_bags) % 2
    key = torch.zeros(dim)
    key[:4], key[4:8] = 3.0, -3.0
    positions = torch.randint(n_instances, (n_bags,), generator=gen)
    for b in torch.nonzero(labels).flatten().tolist():
        x[b, positions[b]] = key + 0.5 * torch.randn(dim, generator=gen)
    return x, labels


def raster_coords(batch: int, n: int, stride: int = 256) -> torch.Tensor:
    """Level-0 coordinates ``[batch, n, 2]`` of n patches in row-major order on a square grid (the same for every
    bag, so a padded bag's first tokens sit where the bag alone puts them)."""
    side = max(1, int(n ** 0.5 + 0.999999))
    index = torch.arange(n)
    return (torch.stack([index % side, index // side], -1) * stride).expand(batch, n, 2).clone()


def forward(model, x, mask=None, targets=None):
    """Call a zoo model, passing ``targets`` only to models that need them (the trainer's convention) and raster
    ``coords`` to position-aware models (``needs_coords``)."""
    kwargs = {"coords": raster_coords(*x.shape[:2])} if getattr(model, "needs_coords", False) else {}
    if targets is not None and getattr(model, "needs_targets", False):
        return model(x, mask=mask, targets=targets, **kwargs)
    return model(x, mask=mask, **kwargs)


def fit_toy(name: str, epochs: int = 12, seed: int = 0, **kwargs) -> float:
    """Train ``name`` with Adam on 240 toy bags, calling the model hooks as the trainers do, and return the accuracy
    on 200 held-out bags."""
    torch.manual_seed(seed)
    model = build_model(name, IN_DIM, 2, **{**TEST_KWARGS.get(name, {}), **kwargs})
    x, y = make_toy_bags(240, seed=seed)
    x_test, y_test = make_toy_bags(200, seed=seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(16):
            out = forward(model, x[batch], targets=y[batch])
            loss = combined_loss(out, lambda logits: F.cross_entropy(logits, y[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.after_optimizer_step()  # the model contract (an EMA anchor updates here)
        model.on_epoch_end(epoch)
    model.eval()
    with torch.no_grad():
        return (forward(model, x_test).logits.argmax(-1) == y_test).float().mean().item()


@pytest.fixture
def toy_bags():
    """The toy generator ``make_toy_bags(n_bags, n_instances=10, dim=IN_DIM, seed=0) -> (x, labels)``."""
    return make_toy_bags


@pytest.fixture
def toy_fit():
    """``fit_toy(name, epochs=12, seed=0, **model_kwargs) -> held-out accuracy``."""
    return fit_toy


@pytest.fixture
def call_model():
    """``forward(model, x, mask=None, targets=None)``: passes targets only to models with ``needs_targets``."""
    return forward


@pytest.fixture
def test_kwargs():
    """Per-model size overrides for fast tests (see ``TEST_KWARGS``)."""
    return TEST_KWARGS
