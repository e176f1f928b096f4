"""Input checks shared by the analyses: attention vectors and instance labels as float64/int numpy arrays.

Every analysis accepts numpy arrays or torch tensors; these helpers convert once, validate shapes and say which
argument is wrong and how to fix it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(values: Any, dtype=np.float64) -> np.ndarray:
    """Convert a numpy array, torch tensor or sequence to a numpy array of ``dtype`` (detached, on CPU)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def as_head_attention(attention: Any, name: str = "attention", atol: float = 1e-4) -> np.ndarray:
    """Return attention as float64 ``[heads, N]``; ``[N]`` becomes ``[1, N]``.

    Each head must be a distribution over the N instances (non-negative, sums to 1 within ``atol``).
    """
    a = to_numpy(attention)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [N] or [heads, N] for one slide, got {a.shape}; "
                         "index a batch first (e.g. out.attention[0]) and drop padded positions")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has no instances (shape {a.shape})")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if (a < -atol).any():
        raise ValueError(f"{name} has negative entries (min {a.min():.3g}); pass post-softmax attention")
    sums = a.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=atol * max(1, a.shape[1] ** 0.5)):
        raise ValueError(f"each head of {name} must sum to 1 over the instances, got sums {np.round(sums, 5)}; "
                         "pass post-softmax attention restricted to the real (unpadded) instances")
    return np.clip(a, 0.0, None)


def head_mean_attention(attention: Any, name: str = "attention") -> np.ndarray:
    """Head-mean attention ā ``[N]`` from ``[N]`` or ``[heads, N]`` (spec abmilx §4.2)."""
    return as_head_attention(attention, name).mean(axis=0)


def as_instance_labels(labels: Any, n: int, name: str = "instance_labels") -> np.ndarray:
    """Binary instance labels ``[N]`` as bool (True = tumour / discriminative instance, the set D of App. A)."""
    y = to_numpy(labels, dtype=np.float64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but the attention has N={n} instances")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be 0/1 (1 = tumour patch); got values {np.unique(y)[:5]}")
    return y.astype(bool)


def unpad_attention(attention: Any, mask: Any | None = None) -> list[np.ndarray]:
    """Split a batch ``[B, heads, N]`` (or ``[B, N]``) into per-slide ``[heads, N_b]`` arrays using ``mask [B, N]``
    (True = real instance), as ``MILOutput.attention`` and ``collate_bags`` produce them."""
    a = to_numpy(attention)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3:
        raise ValueError(f"batched attention must be [B, heads, N] or [B, N], got {a.shape}")
    if mask is None:
        return [a[b] for b in range(a.shape[0])]
    m = to_numpy(mask, dtype=bool)
    if m.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"mask shape {m.shape} does not match attention batch/instances {(a.shape[0], a.shape[2])}")
    return [a[b][:, m[b]] for b in range(a.shape[0])]
