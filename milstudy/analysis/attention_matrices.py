"""Explicit n x n attention matrices of every attention type that LongMIL compares (Li et al., NeurIPS 2024,
§3.2-3.3, Fig. 2; spec ``shared/specs/longmil.md`` §4.1), for the rank analyses of
:mod:`milstudy.analysis.attention_rank`. Small n only (the matrices are dense; n <= 4096 on CPU).

Kinds (labels, parsed by :func:`parse_kind`), with logits ``S = Q Kᵀ / sqrt(d_h)`` and temperature T:

- ``full``: softmax(S / T)  (paper Eq. 5 with the 1/sqrt(d) scale);
- ``local_r<r>``: softmax(S / T + M), M = -inf where the 2-D distance ||p_i - p_j|| > r (paper Eqs. 10-11 in 2-D;
  spec §2.3, tie kept); computed by the dense oracle :func:`milstudy.models.local_attention.dense_local_attention_2d`;
- ``alibi`` / ``alibi_m<m>``: softmax(S / T - m ||p_i - p_j||), no mask (spec §2.3 global layer); slope m = 2^-8
  (the paper's 1 head) unless given;
- ``band_b<b>``: the 1-D band |i - j| <= b in raster order (paper Eqs. 10-14);
- ``nystrom_m<m>``: the Nyström approximation of the zoo's TransMIL layer (Xiong et al. 2021 Eq. 14, segment-mean
  landmarks, front zero padding, 6 pinv iterations: :func:`milstudy.models.layers.nystrom_factors`);
- ``linear``: linear attention with the elu+1 feature map, phi(q_i)·phi(k_j) / Σ_j phi(q_i)·phi(k_j).

Tokens are put in raster order first, so the matrices read like the paper's Fig. 2 raster maps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from milstudy.data.synthetic.foreground import raster_order
from milstudy.models.layers import nystrom_factors
from milstudy.models.local_attention import dense_local_attention_2d

PAPER_ALIBI_SLOPE = 2.0**-8  # one head (spec §2.3)
Projection = Union[tuple[Any, Any], Callable[[np.ndarray], tuple[Any, Any]]]
_PATTERN = re.compile(r"^(full|linear|local_r|band_b|nystrom_m|alibi(?:_m)?)([0-9.]*)$")


@dataclass(frozen=True)
class AttentionKind:
    """One attention type: ``family`` in full | local | alibi | band | nystrom | linear and its one parameter."""

    label: str
    family: str
    parameter: float | None = None


def parse_kind(label: str) -> AttentionKind:
    """``"local_r10"`` -> AttentionKind("local_r10", "local", 10.0); see the module docstring for the labels."""
    match = _PATTERN.match(label) if isinstance(label, str) else None
    if not match:
        raise ValueError(f"attention kind {label!r} not understood; use full, linear, local_r<r>, band_b<b>, "
                         "nystrom_m<landmarks>, alibi or alibi_m<slope>")
    head, number = match.groups()
    family = head.split("_")[0]
    if family in ("full", "linear") or (family == "alibi" and head == "alibi"):
        if number:
            raise ValueError(f"attention kind {label!r}: {family} takes no number (alibi slope: alibi_m<slope>)")
        return AttentionKind(label, family, PAPER_ALIBI_SLOPE if family == "alibi" else None)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"attention kind {label!r}: {head} needs a number, e.g. {head}10") from None
    if family in ("band", "nystrom") and (value != int(value) or value < 1):
        raise ValueError(f"attention kind {label!r}: {family} needs an integer >= 1")
    return AttentionKind(label, family, value)


def spatial_features(positions: np.ndarray, dim: int, seed: int = 0, smoothness: float = 2.0,
                     noise: float = 0.5) -> np.ndarray:
    """WSI-like patch features ``[n, dim]``: per channel a Gaussian-smoothed random field over the grid (sigma
    ``smoothness`` cells; neighbouring patches look alike) plus white noise of relative std ``noise``; each channel
    standardised. ``positions [n, 2]`` integer (u, v)."""
    from scipy.ndimage import gaussian_filter

    pos = np.asarray(positions, dtype=np.int64)
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
        raise ValueError(f"positions must be a non-empty [n, 2] integer array; got shape {pos.shape}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1; got {dim}")
    rng = np.random.default_rng(seed)
    pos = pos - pos.min(0)
    shape = (int(pos[:, 1].max()) + 1, int(pos[:, 0].max()) + 1)
    out = np.empty((len(pos), dim))
    for c in range(dim):
        field = gaussian_filter(rng.standard_normal(shape), sigma=smoothness) if smoothness > 0 else rng.standard_normal(shape)
        values = field[pos[:, 1], pos[:, 0]]
        out[:, c] = values / (values.std() + 1e-12) + noise * rng.standard_normal(len(pos))
    return (out - out.mean(0)) / (out.std(0) + 1e-12)


def random_projection(in_dim: int, head_dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(W_q, W_k)``, each ``[in_dim, head_dim]`` with N(0, 1/in_dim) entries: standardised features give q, k of
    unit variance and logits q·k/sqrt(d_h) of std about 1 (spec §3.8: test bounds at logit std ≈ 1)."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((in_dim, head_dim)) / math.sqrt(in_dim) for _ in range(2))


def _project(features: np.ndarray, projection: Projection) -> tuple[torch.Tensor, torch.Tensor]:
    if callable(projection):
        q, k = projection(features)
    else:
        w_q, w_k = (np.asarray(w, dtype=np.float64) for w in projection)
        if w_q.shape[0] != features.shape[1] or w_k.shape != w_q.shape:
            raise ValueError(f"projection: W_q, W_k must both be [in_dim={features.shape[1]}, d_h]; got "
                             f"{w_q.shape}, {w_k.shape}")
        q, k = features @ w_q, features @ w_k
    q, k = (torch.as_tensor(np.asarray(t, dtype=np.float64)) for t in (q, k))
    if q.shape != k.shape or q.dim() != 2 or q.shape[0] != features.shape[0]:
        raise ValueError(f"projection must give q, k of shape [n={features.shape[0]}, d_h]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    return q, k


def attention_matrix(kind: AttentionKind | str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """The ``[n, n]`` float64 attention matrix of ``kind`` for ``q, k [n, d_h]`` and integer ``positions [n, 2]``
    (already in the order the matrix should have); logits divided by ``temperature`` (module docstring)."""
    kind = parse_kind(kind) if isinstance(kind, str) else kind
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    q, k = q.to(torch.float64), k.to(torch.float64)
    n, d = q.shape
    qt = q / temperature
    if kind.family == "linear":
        phi_q, phi_k = F.elu(qt) + 1, F.elu(k) + 1
        scores = phi_q @ phi_k.T
        return scores / scores.sum(-1, keepdim=True)
    if kind.family == "nystrom":
        m = min(int(kind.parameter), n)
        pad = (-n) % m
        qs, ks = F.pad(qt * d**-0.5, (0, 0, pad, 0)), F.pad(k, (0, 0, pad, 0))  # the layer's front zero padding
        kernel_1, pinv_2, kernel_3 = nystrom_factors(qs, ks, m)
        return (kernel_1 @ pinv_2 @ kernel_3)[pad:, pad:]
    eye = torch.eye(n, dtype=torch.float64)[None, None]
    pos = torch.as_tensor(positions, dtype=torch.long)
    radius, slopes = None, None
    if kind.family == "local":
        radius = kind.parameter
    elif kind.family == "band":
        pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)  # 1-D: |i - j| <= b
        radius = kind.parameter
    elif kind.family == "alibi":
        slopes = [kind.parameter]
    return dense_local_attention_2d(qt[None, None], k[None, None], eye, pos[None], radius, slopes)[0, 0]


def attention_matrices(features: np.ndarray, positions: np.ndarray, kinds: Sequence[str],
                       temperatures: Sequence[float] = (1.0,), projection: Projection | None = None,
                       head_dim: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Records ``{kind, family, temperature, n, attention [n, n], logits [n, n]}`` (numpy float64), one per
    (kind, temperature), for one slide: ``features [n, D]`` and ``positions [n, 2]`` are put in raster order, then
    projected by ``projection`` (``(W_q, W_k)`` ``[D, d_h]``, e.g. a trained layer's, or a callable features ->
    (q, k)); by default :func:`random_projection` with ``seed``. ``logits`` = Q Kᵀ / sqrt(d_h), unmasked."""
    features = np.asarray(features, dtype=np.float64)
    positions = np.asarray(positions)
    if features.ndim != 2 or positions.shape != (features.shape[0], 2):
        raise ValueError(f"features must be [n, D] and positions [n, 2]; got {features.shape}, {positions.shape}")
    order = raster_order(positions)
    features, positions = features[order], positions[order]
    projection = random_projection(features.shape[1], head_dim, seed) if projection is None else projection
    q, k = _project(features, projection)
    logits = (q @ k.T / math.sqrt(q.shape[1])).numpy()
    pos = torch.as_tensor(positions, dtype=torch.long)
    records = []
    for label in kinds:
        kind = parse_kind(label)
        for temperature in temperatures:
            a = attention_matrix(kind, q, k, pos, temperature).numpy()
            records.append({"kind": kind.label, "family": kind.family, "temperature": float(temperature),
                            "n": len(features), "attention": a, "logits": logits})
    return records
