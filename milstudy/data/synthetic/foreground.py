"""Patch-grid foregrounds for attention analyses and benchmarks (LongMIL spec ``shared/specs/longmil.md`` §2.5,
§4.1-4.2): an irregular tissue-like blob filling a share of a square grid, and the full H x W grid.

Positions are integer grid units ``[n, 2]`` = (u, v) = (column, row), returned in raster order (row-major: v,
then u), the order the 1-D band of spec §2.5 and the Fig. 2 raster maps assume.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter


def raster_order(positions: np.ndarray) -> np.ndarray:
    """Indices that sort ``positions [n, 2]`` (u, v) into raster order (by row v, then column u)."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must be [n, 2]; got shape {positions.shape}")
    return np.lexsort((positions[:, 0], positions[:, 1]))


def full_grid(height: int, width: int) -> np.ndarray:
    """Every cell of an ``height x width`` grid as ``[height * width, 2]`` (u, v) in raster order."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1; got {height} x {width}")
    v, u = np.divmod(np.arange(height * width), width)
    return np.stack([u, v], 1).astype(np.int64)


def irregular_foreground(n: int, fill: float = 0.7, seed: int = 0, smoothness: float = 0.12) -> np.ndarray:
    """``n`` distinct cells of a ``ceil(sqrt(n / fill))``-sided square grid forming an irregular blob with lobes and
    holes: the n cells with the highest value of a smoothed random field (Gaussian, sigma = ``smoothness`` x side)
    plus a radial falloff. Returns ``[n, 2]`` int64 (u, v), raster order; the grid share filled is about ``fill``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must lie in (0, 1]; got {fill!r}")
    if smoothness <= 0:
        raise ValueError(f"smoothness must be > 0; got {smoothness!r}")
    side = int(math.ceil(math.sqrt(n / fill)))
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal((side, side)), sigma=max(smoothness * side, 0.5), mode="wrap")
    field /= field.std() + 1e-12
    v, u = np.mgrid[0:side, 0:side]
    radius = np.hypot(u - (side - 1) / 2, v - (side - 1) / 2) / (side / 2)
    score = field - 2.5 * radius**2 + 1e-9 * rng.standard_normal((side, side))  # tiny jitter: no ties
    keep = np.argsort(score.ravel())[::-1][:n]
    cells = np.stack([u.ravel()[keep], v.ravel()[keep]], 1).astype(np.int64)
    return cells[raster_order(cells)]
