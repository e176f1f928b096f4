"""Position-aware models (``needs_coords``) refuse bags without coordinates instead of training on zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from milstudy.data.bags import Bag, BagError, BagListDataset, collate_bags
from milstudy.models.base import MILModel, MILOutput
from milstudy.train.two_stage import TrainConfig, train_two_stage
from milstudy.train.tasks import ClassificationTask


class WhereMIL(MILModel):
    """Mean of features plus the mean coordinate: uses positions, so it says so."""

    needs_coords = True

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim + 2, n_out)

    def forward(self, x, coords=None, mask=None):
        where = coords.float().mean(1) / 100.0
        return MILOutput(self.head(torch.cat([x.mean(1), where], -1)))


def _bags(with_coords: bool, n: int = 8):
    rng = np.random.default_rng(0)
    return [Bag(features=torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32)), slide_id=f"b{i}",
                target=i % 2, coords=torch.arange(8).view(4, 2) * 10 if with_coords else None) for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_bags_without_coords_are_refused_by_a_position_aware_model(batch_size):
    config = TrainConfig(epochs=1, quiet=True, device="cpu", batch_size=batch_size)
    bags = _bags(with_coords=False)
    with pytest.raises(ValueError, match=r"WhereMIL is position-aware and needs patch coordinates.*h5_files"):
        train_two_stage(WhereMIL(3, 2), ClassificationTask(2), BagListDataset(bags[:6]), BagListDataset(bags[6:]),
                        config=config)
    with_coords = _bags(with_coords=True)
    train_two_stage(WhereMIL(3, 2), ClassificationTask(2), BagListDataset(with_coords[:6]),
                    BagListDataset(with_coords[6:]), config=config)


def test_collate_gives_no_coords_for_coordless_bags_and_refuses_a_mix():
    assert collate_bags(_bags(False, 2))["coords"] is None
    assert collate_bags(_bags(True, 2))["coords"].shape == (2, 4, 2)
    with pytest.raises(BagError, match="mixes bags with and without coordinates"):
        collate_bags(_bags(True, 1) + _bags(False, 1))
