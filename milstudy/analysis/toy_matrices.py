"""LongMIL Fig. 5 / App. A.3 toy matrices (Li et al., NeurIPS 2024; specs/longmil.md §4.6 and invariant 5): on a
small square grid in raster order, HIPT's region slicing, LongMIL's 2-D local mask, 2-D ALiBi and a 1-D band mask
over the raster ("z-scan") serialisation, as exact arrays, and how many grid neighbours each one keeps.

The paper says the local mask "can be seen as a generalization of HIPT and 2-d ALiBi": a token's HIPT region
(``region x region`` cells) lies within distance ``sqrt(2) (region - 1)`` of it, so the region mask is a subset of
the local mask at any radius of at least that; and the local mask is ALiBi's bias thresholded at ``-slope * r``.
A 1-D band over the raster order keeps horizontal neighbours and drops vertical ones (or, wide enough to reach
them, keeps far tokens too): the x/y asymmetry of serialising a 2-D grid.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Fig. 5's printed ALiBi row of token 0 on the 4 x 4 grid at slope 1 (spec §4.6), three decimals
FIG5_ALIBI_ROW0 = (0.0, -1.0, -2.0, -3.0, -1.0, -1.414, -2.236, -3.162, -2.0, -2.236, -2.828, -3.606, -3.0, -3.162,
                   -3.606, -4.243)


def raster_grid(side: int) -> np.ndarray:
    """Positions ``[side * side, 2]`` as (x, y) of a full ``side x side`` grid in raster order (index y * side + x)."""
    if side < 1:
        raise ValueError(f"raster_grid: side must be >= 1, got {side}")
    y, x = np.divmod(np.arange(side * side), side)
    return np.stack([x, y], 1)


def distances(positions: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[N, N]`` between grid positions ``[N, 2]``."""
    positions = np.asarray(positions, dtype=np.float64)
    return np.sqrt(((positions[:, None, :] - positions[None, :, :]) ** 2).sum(-1))


def alibi_bias(positions: np.ndarray, slope: float = 1.0) -> np.ndarray:
    """2-D ALiBi: ``-slope * D_ij`` (spec §2.3)."""
    return -float(slope) * distances(positions)


def local_mask(positions: np.ndarray, radius: float) -> np.ndarray:
    """LongMIL's local mask: key j is visible to query i when ``D_ij <= radius`` (the boundary kept)."""
    return distances(positions) <= radius + 1e-12


def region_mask(positions: np.ndarray, region: int) -> np.ndarray:
    """HIPT region slicing: tokens attend within their ``region x region`` cell of the grid (block-diagonal in
    region order, a permuted block pattern in raster order)."""
    if region < 1:
        raise ValueError(f"region_mask: region must be >= 1, got {region}")
    cells = np.asarray(positions) // region
    return (cells[:, None, :] == cells[None, :, :]).all(-1)


def band_mask(n: int, band: int) -> np.ndarray:
    """A 1-D band over the serialisation order: ``|i - j| <= band``."""
    index = np.arange(n)
    return np.abs(index[:, None] - index[None, :]) <= band


def fig5_matrices(side: int = 4, radius: float = 1.5, region: int = 2, band: int = 1, slope: float = 1.0
                  ) -> dict[str, np.ndarray]:
    """The four panels of Fig. 5 on a ``side x side`` raster grid: region slicing, local mask, ALiBi, 1-D band."""
    positions = raster_grid(side)
    return {f"HIPT regions {region}x{region}": region_mask(positions, region),
            f"local mask r={radius:g}": local_mask(positions, radius),
            f"2-D ALiBi slope {slope:g}": alibi_bias(positions, slope),
            f"1-D band b={band} (raster)": band_mask(len(positions), band)}


def neighbour_coverage(masks: dict[str, np.ndarray], positions: np.ndarray) -> pd.DataFrame:
    """Per boolean mask: kept ordered pairs (i != j), the share of horizontal, vertical and diagonal grid
    neighbours (distance 1 along x, along y, sqrt 2) it keeps, and the pairs it keeps that are farther than
    ``sqrt(2)`` (tokens that are not grid neighbours)."""
    positions = np.asarray(positions)
    delta = np.abs(positions[:, None, :] - positions[None, :, :])
    off = ~np.eye(len(positions), dtype=bool)
    kinds = {"horizontal": (delta[..., 0] == 1) & (delta[..., 1] == 0),
             "vertical": (delta[..., 0] == 0) & (delta[..., 1] == 1),
             "diagonal": (delta[..., 0] == 1) & (delta[..., 1] == 1)}
    far = distances(positions) > np.sqrt(2) + 1e-12
    rows = []
    for name, mask in masks.items():
        if mask.dtype != bool:
            continue
        row = {"mask": name, "kept_pairs": int((mask & off).sum())}
        row.update({f"{kind}_kept": float(mask[pairs].mean()) for kind, pairs in kinds.items()})
        row["non_neighbours_kept"] = int((mask & far).sum())
        rows.append(row)
    return pd.DataFrame(rows)
