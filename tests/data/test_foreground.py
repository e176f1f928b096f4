"""Grid foregrounds for the LongMIL analyses (spec §4.1-4.2): n distinct cells, raster order, the asked fill share."""

from __future__ import annotations

import numpy as np
import pytest

from milstudy.data.synthetic.foreground import full_grid, irregular_foreground, raster_order


@pytest.mark.parametrize("n,fill", [(500, 0.7), (5000, 0.5)])
def test_irregular_foreground_has_n_distinct_cells_in_raster_order(n, fill):
    cells = irregular_foreground(n, fill=fill, seed=1)
    assert cells.shape == (n, 2) and cells.dtype == np.int64
    assert len({tuple(c) for c in cells}) == n
    np.testing.assert_array_equal(raster_order(cells), np.arange(n))
    side = int(np.ceil(np.sqrt(n / fill)))
    assert cells.min() >= 0 and cells.max() < side
    assert n / side**2 == pytest.approx(fill, abs=0.05)
    rows_filled = np.bincount(cells[:, 1], minlength=side)
    assert rows_filled.min() < rows_filled.max() / 2  # not a square or a rectangle: irregular rows


def test_full_grid_is_row_major():
    grid = full_grid(2, 3)
    np.testing.assert_array_equal(grid, [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]])
    with pytest.raises(ValueError, match="height and width"):
        full_grid(0, 3)
    with pytest.raises(ValueError, match="fill"):
        irregular_foreground(10, fill=1.5)
    with pytest.raises(ValueError, match="n must be"):
        irregular_foreground(0)
