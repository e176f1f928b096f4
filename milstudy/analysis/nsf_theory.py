"""Numerical checks of ASMIL's Theorem 1: the normalised sigmoid "selectively flattens" (specs/asmil.md §2.4, §6.3-4;
paper §4.2 and App. E, whose symbols were lost in conversion and are reconstructed in the spec).

Setting: ``h`` high logits in ``[tau, tau + delta]`` and low logits ``<= ell``.

- (A) NSF (``nsf_bounds``): any two high weights are within a factor ``sigmoid(tau + delta) / sigmoid(tau)``
  (-> 1 as tau grows, delta fixed) and every low weight is at most ``sigmoid(ell) / (h sigmoid(tau))``.
- (B) softmax at temperature T (``softmax_window``): the worst high/high ratio is ``exp(delta / T)``, so matching
  NSF's ratio ``1 + epsilon`` needs ``T >= delta / ln(1 + epsilon)``; bounding every low weight by NSF's ``eta``
  needs ``T <= (tau - ell) / ln((1 - eta) / (h eta))``. With epsilon, eta taken from (A), the lower bound grows like
  ``e^tau`` and the upper bound linearly, so past some tau* no single temperature does both.

``theorem1_table`` tabulates both over tau, ``softmax_grid`` checks softmax on the worst-case vectors over a grid of
temperatures, and ``random_high_low`` draws vectors from the set to test (A) empirically. ``shift_curve`` shows
what (A) implies in practice: NSF depends on the logits' offset (softmax does not), so the anchor's logit scale
decides whether its target is near softmax (all logits << 0), near uniform (logits ~ 0) or flat-topped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.special import expit, log_softmax, softmax

from milstudy.analysis.sparsity import normalized_entropy


def nsf_np(z: np.ndarray, temperature: float = 1.0, eps: float = 0.0) -> np.ndarray:
    """NSF_T(z) over the last axis in float64 (spec §2.4; eps = 0 here, the library's torch NSF uses 1e-8)."""
    s = expit(np.asarray(z, np.float64) / temperature)
    return s / (s.sum(-1, keepdims=True) + eps)


def _check(tau: float, delta: float, h: int, ell: float | None = None) -> None:
    if delta <= 0 or h < 1:
        raise ValueError(f"Theorem 1 needs delta > 0 and h >= 1 high logits, got delta={delta}, h={h}")
    if ell is not None and not ell < tau:
        raise ValueError(f"Theorem 1 needs the low logits below the high ones: ell < tau, got ell={ell}, tau={tau}")


def nsf_bounds(tau: float, delta: float, ell: float, h: int) -> dict[str, float]:
    """Theorem 1(A): the high/high ratio bound and the low-weight bound of NSF (T = 1)."""
    _check(tau, delta, h, ell)
    return {"nsf_high_ratio": float(expit(tau + delta) / expit(tau)),
            "nsf_low_bound": float(expit(ell) / (h * expit(tau)))}


def softmax_window(tau: float, delta: float, ell: float, h: int, epsilon: float, eta: float) -> dict[str, float]:
    """Theorem 1(B): the temperatures at which softmax meets NSF's targets: ``t_min`` (high/high ratio <= 1 + eps)
    and ``t_max`` (every low weight <= eta); ``feasible`` when ``t_min <= t_max``."""
    _check(tau, delta, h)
    t_min = delta / np.log1p(epsilon) if epsilon > 0 else np.inf
    ratio = (1 - eta) / (h * eta)
    t_max = (tau - ell) / np.log(ratio) if ratio > 1 else np.inf
    return {"t_min": float(t_min), "t_max": float(t_max), "feasible": bool(t_min <= t_max)}


def theorem1_table(taus: Sequence[float], delta: float = 1.0, ell: float = -2.0, h: int = 4) -> pd.DataFrame:
    """One row per tau: NSF's bounds (A), the softmax window (B) with epsilon = ratio - 1 and eta = low bound."""
    rows = []
    for tau in taus:
        a = nsf_bounds(tau, delta, ell, h)
        b = softmax_window(tau, delta, ell, h, a["nsf_high_ratio"] - 1, a["nsf_low_bound"])
        rows.append({"tau": float(tau), "delta": delta, "ell": ell, "h": h, **a, **b})
    return pd.DataFrame(rows)


def first_infeasible_tau(table: pd.DataFrame) -> float:
    """The smallest tau of the table from which on no softmax temperature meets both targets (NaN if none)."""
    infeasible = ~table["feasible"].to_numpy()
    for i in range(len(table)):
        if infeasible[i:].all():
            return float(table["tau"].iloc[i])
    return float("nan")


def worst_case_vectors(tau: float, delta: float, ell: float, h: int, n_low: int = 8,
                       far: float = -1e3) -> tuple[np.ndarray, np.ndarray]:
    """(ratio vector, low vector) of (B): one high at tau + delta and the rest at tau with the lows at ell; and all
    highs at tau, one low at ell, the other lows at ``far`` (standing in for -inf)."""
    _check(tau, delta, h)
    ratio = np.r_[tau + delta, np.full(h - 1, tau), np.full(n_low, ell)]
    low = np.r_[np.full(h, tau), ell, np.full(n_low - 1, far)]
    return ratio, low


def softmax_grid(tau: float, delta: float, ell: float, h: int, temperatures: Sequence[float],
                 n_low: int = 8) -> pd.DataFrame:
    """Softmax at each temperature on the worst-case vectors, against NSF's targets from (A): the realised high/high
    ratio and largest low weight, and whether each target is met (``meets_both``)."""
    targets = nsf_bounds(tau, delta, ell, h)
    ratio_vec, low_vec = worst_case_vectors(tau, delta, ell, h, n_low)
    rows = []
    for t in temperatures:
        log_p = log_softmax(ratio_vec / t)  # log space: no 0/0 at small T
        with np.errstate(over="ignore"):
            high_ratio = float(np.exp(log_p[0] - log_p[1:h].min())) if h > 1 else float(np.exp(delta / t))
        low_weight = float(softmax(low_vec / t)[h])
        rows.append({"temperature": float(t), "softmax_high_ratio": high_ratio, "softmax_low_weight": low_weight,
                     "meets_ratio": high_ratio <= targets["nsf_high_ratio"] * (1 + 1e-12),
                     "meets_low": low_weight <= targets["nsf_low_bound"] * (1 + 1e-12)})
    frame = pd.DataFrame(rows)
    frame["meets_both"] = frame["meets_ratio"] & frame["meets_low"]
    return frame


def random_high_low(tau: float, delta: float, ell: float, h: int, n_low: int, n_draws: int,
                    rng: np.random.Generator, low_spread: float = 5.0) -> np.ndarray:
    """``[n_draws, h + n_low]`` logits from the theorem's set: highs uniform in [tau, tau + delta], lows uniform in
    [ell - low_spread, ell]."""
    highs = rng.uniform(tau, tau + delta, size=(n_draws, h))
    lows = rng.uniform(ell - low_spread, ell, size=(n_draws, n_low))
    return np.concatenate([highs, lows], axis=1)


def empirical_nsf(tau: float, delta: float, ell: float, h: int, n_low: int = 16, n_draws: int = 2000,
                  seed: int = 0) -> dict[str, float]:
    """The largest high/high ratio and low weight NSF gives on random vectors of the set, beside (A)'s bounds."""
    z = random_high_low(tau, delta, ell, h, n_low, n_draws, np.random.default_rng(seed))
    p = nsf_np(z)
    highs, lows = p[:, :h], p[:, h:]
    return {"tau": float(tau), "max_high_ratio": float((highs.max(1) / highs.min(1)).max()),
            "max_low_weight": float(lows.max()), **nsf_bounds(tau, delta, ell, h)}


def shift_curve(logits: np.ndarray, shifts: Sequence[float], temperature: float = 1.0) -> pd.DataFrame:
    """Normalised entropy of NSF_T(z + c) and softmax(z / T) for each shift c (softmax is shift-invariant)."""
    z = np.asarray(logits, np.float64)
    base = normalized_entropy(softmax(z / temperature))
    return pd.DataFrame([{"shift": float(c), "nsf_entropy": normalized_entropy(nsf_np(z + c, temperature)),
                          "softmax_entropy": base} for c in shifts])


def target_concentration(logits: dict[str, np.ndarray], temperatures: Sequence[float] = (0.5, 1, 2, 5, 10)
                         ) -> pd.DataFrame:
    """How flat each candidate anchor target is on given attention logits (``{slide_id: [N] or [heads, N]}``, head
    mean of the per-head distributions): one row per (slide_id, target, temperature) with the normalised entropy,
    the top-1 mass and ``top_ratio`` = largest / 10th-largest weight (1 = the top tiles equalised)."""
    rows = []
    for slide_id, z in logits.items():
        z = np.atleast_2d(np.asarray(z, np.float64))
        for t in temperatures:
            for kind, p in (("NSF", nsf_np(z, t)), ("softmax", softmax(z / t, axis=-1))):
                p = p.mean(0)
                top = np.sort(p)[::-1]
                rows.append({"slide_id": slide_id, "target": kind, "temperature": float(t),
                             "normalized_entropy": normalized_entropy(p), "top1_mass": float(top[0]),
                             "top_ratio": float(top[0] / top[min(9, len(top) - 1)])})
    return pd.DataFrame(rows)
