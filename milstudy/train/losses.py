"""Survival losses and time binning (specs/abmilx.md §2.6; upstream ABMILX survival code, our own implementation).

Discrete-time survival (the default): follow-up time is cut into ``K`` bins at the quantiles of the **uncensored**
times; the model emits one logit per bin, ``h_k = σ(ℓ_k)`` is the hazard of bin ``k``,
``S_k = Π_{i ≤ k} (1 - h_i)`` the survival after bin ``k`` (``S_{-1} = 1``), and with censoring indicator ``c``
(1 = censored) and true bin ``y``:

    L = -(1 - c) [log S_{y-1} + log h_y] - c log S_y      (clamped at 1e-7, batch mean, fp32)

The risk used for the C-index is ``-Σ_k S_k`` (higher = earlier death).

Cox partial likelihood (Breslow ties) is offered for batches of several slides: with log-risk ``r_i``,
``L = -(1 / n_events) Σ_{i: event} [r_i - log Σ_{j: t_j ≥ t_i} exp(r_j)]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

EPS = 1e-7


def survival_bins(
    times: Sequence[float],
    events: Sequence[int | bool],
    n_bins: int = 4,
) -> np.ndarray:
    """Bin edges ``float64[n_bins + 1]`` cut at the quantiles of the uncensored times (numpy "linear").

    The outer edges are extended to the minimum / maximum of **all** times (censored included). Bins are
    left-closed: bin ``k`` holds ``edges[k] <= t < edges[k+1]`` (the last bin also holds the maximum). Pass the
    whole cohort for the upstream convention (reproduces the ABMILX manifest ``Label`` column), or only the training
    rows for train-only edges.
    """
    times = np.asarray(times, dtype=np.float64)
    events = np.asarray(events).astype(bool)
    if times.ndim != 1 or times.shape != events.shape:
        raise ValueError(f"survival_bins: times {times.shape} and events {events.shape} must be equal 1-D shapes")
    if not np.isfinite(times).all():
        raise ValueError("survival_bins: times contain NaN/inf; fix the survival_months column")
    if n_bins < 1:
        raise ValueError(f"survival_bins: n_bins must be >= 1, got {n_bins}")
    uncensored = times[events]
    if len(uncensored) < n_bins:
        raise ValueError(
            f"survival_bins: {len(uncensored)} uncensored times cannot define {n_bins} quantile bins; "
            "use fewer bins or pass bin_edges explicitly"
        )
    edges = np.quantile(uncensored, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = times.min()
    edges[-1] = times.max()
    return edges


def assign_bins(times: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index ``int64[n]`` of each time: the number of inner edges ``<= t`` (left-closed bins).

    Times below the first or above the last edge fall into the first / last bin.
    """
    inner = np.asarray(edges, dtype=np.float64)[1:-1]
    return np.searchsorted(inner, np.asarray(times, dtype=np.float64), side="right").astype(np.int64)


def hazards_and_survival(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [B, K]`` -> hazards ``h = σ(ℓ)`` and survival ``S_k = Π_{i≤k}(1 - h_i)``, both ``[B, K]`` fp32."""
    hazards = torch.sigmoid(logits.float())
    return hazards, torch.cumprod(1.0 - hazards, dim=1)


def risk_from_hazards(logits: torch.Tensor) -> torch.Tensor:
    """Risk ``[B] = -Σ_k S_k`` from hazard logits ``[B, K]`` (higher risk = shorter expected survival)."""
    return -hazards_and_survival(logits)[1].sum(dim=1)


def survival_nll(logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (module docstring), batch mean, computed in fp32.

    logits: ``[B, K]`` hazard logits; bins: ``[B]`` int bin index ``y``; events: ``[B]`` 1 = event, 0 = censored.
    """
    if logits.ndim != 2:
        raise ValueError(f"survival_nll: logits must be [B, K], got shape {tuple(logits.shape)}")
    hazards, survival = hazards_and_survival(logits)
    bins = bins.long().view(-1, 1)
    if (bins < 0).any() or (bins >= logits.shape[1]).any():
        raise ValueError(f"survival_nll: bin indices must be in [0, {logits.shape[1] - 1}]")
    censored = 1.0 - events.float().view(-1, 1)
    # S padded with S_{-1} = 1 so that index y of the padded tensor is S_{y-1} and index y+1 is S_y.
    survival_padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)
    s_before = torch.gather(survival_padded, 1, bins).clamp_min(EPS)
    s_at = torch.gather(survival_padded, 1, bins + 1).clamp_min(EPS)
    h_at = torch.gather(hazards, 1, bins).clamp_min(EPS)
    loss = -(1.0 - censored) * (torch.log(s_before) + torch.log(h_at)) - censored * torch.log(s_at)
    return loss.mean()


def cox_partial_nll(log_risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over the events of the batch.

    log_risk: ``[B]`` (or ``[B, 1]``); times: ``[B]``; events: ``[B]`` 1 = event. A batch without events gives a
    zero loss that still carries the graph (nothing to learn from it).
    """
    log_risk = log_risk.float().reshape(-1)
    times = times.float().reshape(-1)
    events = events.float().reshape(-1)
    if not (log_risk.shape == times.shape == events.shape):
        raise ValueError("cox_partial_nll: log_risk, times and events must have one value per slide")
    n_events = events.sum()
    if n_events == 0:
        return log_risk.sum() * 0.0
    # at_risk[i, j] = 1 if t_j >= t_i: the Breslow risk set of i includes its ties.
    at_risk = times.view(1, -1) >= times.view(-1, 1)
    masked = log_risk.view(1, -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)
    return -((log_risk - log_denominator) * events).sum() / n_events
