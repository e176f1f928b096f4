"""LongMIL Fig. 5 toy matrices (milstudy.analysis.toy_matrices): the printed ALiBi values (spec invariant 5), in our
kernels too, and the region / local / band masks' exact structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milstudy.analysis.toy_matrices import (FIG5_ALIBI_ROW0, alibi_bias, band_mask, fig5_matrices, local_mask,
                                            neighbour_coverage, raster_grid, region_mask)
from milstudy.models import dense_local_attention_2d, full_attention_2d_alibi, local_attention_2d


def test_alibi_on_the_4x4_grid_is_fig5_symmetric_with_a_zero_diagonal():
    bias = alibi_bias(raster_grid(4), slope=1.0)
    np.testing.assert_allclose(bias[0], FIG5_ALIBI_ROW0, atol=1e-3)
    np.testing.assert_allclose(bias, bias.T)
    assert np.all(np.diag(bias) == 0) and bias[0, 15] == pytest.approx(-np.sqrt(18))


@pytest.mark.parametrize("kernel", ["oracle", "chunked_full", "local_r_large"])
def test_our_attention_kernels_carry_the_fig5_bias(kernel):
    """With q = k = 0 the attention is softmax(bias): log A[0, j] - log A[0, 0] is Fig. 5's row, in the oracle, the
    chunked global layer and the tiled local kernel with a radius beyond the grid."""
    coords = torch.as_tensor(raster_grid(4))[None]
    q = torch.zeros(1, 1, 16, 8, dtype=torch.float64)
    eye = torch.eye(16, dtype=torch.float64)[None, None]
    slopes = torch.tensor([1.0], dtype=torch.float64)
    attention = {"oracle": lambda: dense_local_attention_2d(q, q, eye, coords, None, slopes),
                 "chunked_full": lambda: full_attention_2d_alibi(q, q, eye, coords, slopes, chunk=5),
                 "local_r_large": lambda: local_attention_2d(q, q, eye, coords, 10.0, slopes)}[kernel]()
    log_ratio = (attention[0, 0, 0].log() - attention[0, 0, 0, 0].log()).numpy()
    np.testing.assert_allclose(log_ratio, FIG5_ALIBI_ROW0, atol=1e-3)


def test_region_slicing_is_a_special_case_of_the_local_mask_and_the_band_is_asymmetric():
    positions = raster_grid(4)
    panels = fig5_matrices()
    regions, local, band = (panels[k] for k in ("HIPT regions 2x2", "local mask r=1.5", "1-D band b=1 (raster)"))
    assert regions.sum() == 16 * 4 and np.array_equal(regions[0].nonzero()[0], [0, 1, 4, 5])
    assert np.all(local[regions]) and (local & ~regions).any()  # regions ⊂ local mask at r >= sqrt(2)
    assert np.array_equal(local, panels["2-D ALiBi slope 1"] >= -1.5)  # the local mask thresholds ALiBi
    coverage = neighbour_coverage(panels, positions).set_index("mask")
    assert coverage.loc["local mask r=1.5", ["horizontal_kept", "vertical_kept", "diagonal_kept"]].tolist() == [1, 1, 1]
    assert coverage.loc["local mask r=1.5", "non_neighbours_kept"] == 0
    assert coverage.loc["1-D band b=1 (raster)", ["horizontal_kept", "vertical_kept"]].tolist() == [1, 0]
    assert coverage.loc["1-D band b=1 (raster)", "non_neighbours_kept"] == 6  # row ends wrap to the next row
    wide = neighbour_coverage({"b=4": band_mask(16, 4)}, positions).iloc[0]
    assert wide["vertical_kept"] == 1 and wide["non_neighbours_kept"] > 0  # reaching vertical costs far tokens
    assert "2-D ALiBi slope 1" not in coverage.index  # a bias, not a mask
    assert np.array_equal(local_mask(positions, 1.0).sum(1), [3, 4, 4, 3, 4, 5, 5, 4, 4, 5, 5, 4, 3, 4, 4, 3])
    with pytest.raises(ValueError, match="region must be >= 1"):
        region_mask(positions, 0)
    with pytest.raises(ValueError, match="side must be >= 1"):
        raster_grid(0)
