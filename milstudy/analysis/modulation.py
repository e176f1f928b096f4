"""The modulation factor Λ of the ABMILX attention-plus module (ABMILX paper, Appendix A.2, Eqs. 13-33).

With local (pre-A+) logits a, the A+ term Δ = α U a, â = softmax(a) and the most-attended noise instance
i' = argmax_{i∈N} â_i, Eq. 17 factorises the refined attention of i':

    softmax(a + Δ)_{i'} = â_{i'} · Λ,     Λ = e^{Δ_{i'}} / Σ_k â_k e^{Δ_k}.

Λ ≤ 1 means A+ lowered the risk of App. A (Eq. 28). By Jensen (Eq. 19) Σ_k â_k e^{Δ_k} ≥ e^{Σ_k â_k Δ_k}, so
Σ_k â_k Δ_k ≥ Δ_{i'} is a sufficient condition (Eqs. 25-27). The paper's argument assumes α > 0; upstream starts α
from N(0, 1) (spec pitfall 1), so shares are reported split by the sign of α.

Our choices (spec §4.2): N = non-tumour instances of positive slides; one Λ per (slide, head).
The ABMILX model exposes ``extras["local_logits"]`` (a) and ``extras["attn_plus_delta"]`` (Δ), both ``[B, heads, N]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp, softmax

from milstudy.analysis._arrays import as_instance_labels, to_numpy


def _as_logits(values: Any, name: str) -> np.ndarray:
    x = to_numpy(values)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N] or [heads, N] for one slide, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def eq17_identity_residual(local_logits: Any, delta: Any) -> float:
    """Max |softmax(a+Δ)_i - softmax(a)_i e^{Δ_i} / Σ_k softmax(a)_k e^{Δ_k}| over all i (and heads).

    local_logits a, delta Δ: ``[N]`` or ``[heads, N]``. Eq. 17/33 says this is 0; in float64 it is ~1e-16.
    """
    a, d = _as_logits(local_logits, "local_logits"), _as_logits(delta, "delta")
    if a.shape != d.shape:
        raise ValueError(f"local_logits {a.shape} and delta {d.shape} must have the same shape")
    direct = softmax(a + d, axis=-1)
    a_hat = softmax(a, axis=-1)
    factorised = a_hat * np.exp(d) / np.sum(a_hat * np.exp(d), axis=-1, keepdims=True)
    return float(np.max(np.abs(direct - factorised)))


def modulation_factor(local_logits: Any, delta: Any, instance_labels: Any) -> pd.DataFrame:
    """Λ of Eq. 17 per head for one positive slide.

    local_logits a, delta Δ: ``[N]`` or ``[heads, N]``; instance_labels ``[N]`` 0/1 (1 = tumour).
    Returns one row per head with ``lambda`` (Λ), ``lambda_le_1``, ``noise_index`` (i'), ``attn_before`` (â_{i'}),
    ``attn_after`` (softmax(a+Δ)_{i'} = â_{i'}Λ) and ``jensen_condition`` (Σ_k â_k Δ_k ≥ Δ_{i'}, which implies Λ ≤ 1).
    Computed in log space: log Λ = Δ_{i'} - logsumexp(log â + Δ).
    """
    a, d = _as_logits(local_logits, "local_logits"), _as_logits(delta, "delta")
    if a.shape != d.shape:
        raise ValueError(f"local_logits {a.shape} and delta {d.shape} must have the same shape")
    tumour = as_instance_labels(instance_labels, a.shape[1])
    noise = ~tumour
    if not noise.any():
        raise ValueError("the modulation factor needs at least one non-tumour (noise) instance")
    log_a_hat = a - logsumexp(a, axis=-1, keepdims=True)
    a_hat = np.exp(log_a_hat)
    noise_idx = np.flatnonzero(noise)
    rows = []
    for head in range(a.shape[0]):
        i_prime = int(noise_idx[np.argmax(a_hat[head, noise_idx])])
        log_lambda = d[head, i_prime] - logsumexp(log_a_hat[head] + d[head])
        lam = float(np.exp(log_lambda))
        rows.append({
            "head": head,
            "lambda": lam,
            "lambda_le_1": bool(log_lambda <= 1e-12),
            "noise_index": i_prime,
            "attn_before": float(a_hat[head, i_prime]),
            "attn_after": float(a_hat[head, i_prime] * lam),
            "jensen_condition": bool(a_hat[head] @ d[head] >= d[head, i_prime]),
        })
    return pd.DataFrame(rows)


def cohort_modulation(
    local_logits: Sequence[Any],
    deltas: Sequence[Any],
    instance_labels: Sequence[Any],
    alpha: float | Sequence[float] = float("nan"),
    slide_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """(slide, head) table of Λ over the positive slides of a cohort (slides without tumour or noise skipped).

    local_logits[i], deltas[i]: ``[heads, N_i]``; instance_labels[i]: ``[N_i]``; alpha: α of the model (one value or
    one per slide) for the sign split of :func:`lambda_share`.
    """
    alphas = [alpha] * len(local_logits) if np.isscalar(alpha) else list(alpha)
    frames = []
    for i, (a, d, y) in enumerate(zip(local_logits, deltas, instance_labels)):
        labels = np.asarray(y).reshape(-1)
        if labels.sum() == 0 or labels.sum() == labels.shape[0]:
            continue
        frame = modulation_factor(a, d, labels)
        frame.insert(0, "slide_id", slide_ids[i] if slide_ids is not None else str(i))
        frame["alpha"] = float(alphas[i])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def lambda_share(table: pd.DataFrame) -> pd.DataFrame:
    """Share of (slide, head) pairs with Λ ≤ 1, overall and split by the sign of α (rows ``all``, ``alpha>0``,
    ``alpha<0``, ``alpha unknown``), with the pair count and the median Λ."""
    if table.empty:
        return pd.DataFrame(columns=["alpha_sign", "pairs", "share_lambda_le_1", "median_lambda"])
    sign = np.where(table["alpha"] > 0, "alpha>0", np.where(table["alpha"] < 0, "alpha<0", "alpha unknown"))
    rows = []
    for name, part in [("all", table), *[(s, table[sign == s]) for s in ("alpha>0", "alpha<0", "alpha unknown")]]:
        if len(part):
            rows.append({"alpha_sign": name, "pairs": len(part), "share_lambda_le_1": float(part["lambda_le_1"].mean()),
                         "median_lambda": float(part["lambda"].median())})
    return pd.DataFrame(rows)


def model_alpha(model: torch.nn.Module) -> float:
    """The scalar α of an ABMILX model (first parameter or buffer named ``*alpha*`` with one element), else NaN."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "alpha" in name.split(".")[-1] or name.split(".")[-2:-1] == ["alpha"]:
            if tensor.numel() == 1:
                return float(tensor.detach().reshape(()).item())
    value = getattr(model, "alpha", None)
    if isinstance(value, (int, float)):
        return float(value)
    return float("nan")


@torch.no_grad()
def model_internals(model: torch.nn.Module, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run an ABMILX-like model on one bag in eval mode and return (local_logits a, Δ, attention), each ``[heads, N]``.

    features: ``[N, D]`` or ``[1, N, D]``. Checks that softmax(a + Δ) reproduces the model's attention, so Λ is
    computed from the quantities the model really used (accepts ``attn_plus_delta`` holding either Δ or a + Δ).
    """
    x = features if features.ndim == 3 else features[None]
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was_training)
    for key in ("local_logits", "attn_plus_delta"):
        if key not in out.extras:
            raise KeyError(f"model output has no extras[{key!r}]; Λ needs an ABMILX-style model "
                           f"(extras present: {sorted(out.extras)})")
    a = to_numpy(out.extras["local_logits"][0])
    d = to_numpy(out.extras["attn_plus_delta"][0])
    attention = to_numpy(out.attention[0])
    if not np.allclose(softmax(a + d, axis=-1), attention, atol=1e-5):
        if np.allclose(softmax(d, axis=-1), attention, atol=1e-5):
            d = d - a  # the model stored the refined logits a + Δ
        else:
            raise ValueError("softmax(local_logits + attn_plus_delta) does not reproduce the model's attention; "
                             "check the ABMILX extras (local_logits = pre-A+ logits, attn_plus_delta = αUa)")
    return a, d, attention


def modulation_from_model(model: torch.nn.Module, bag: Any, instance_labels: Any | None = None) -> pd.DataFrame:
    """Λ per head (Eq. 17) of a trained ABMILX model on one bag.

    bag: a ``milstudy.data.bags.Bag`` (uses ``bag.features [N, D]`` and ``bag.instance_labels``) or a features
    tensor ``[N, D]``; instance_labels ``[N]`` overrides the bag's. Returns :func:`modulation_factor`'s table plus
    ``alpha`` and ``slide_id``.
    """
    features = getattr(bag, "features", bag)
    labels = instance_labels if instance_labels is not None else getattr(bag, "instance_labels", None)
    if labels is None:
        raise ValueError("modulation_from_model needs instance labels (bag.instance_labels or instance_labels=)")
    param = next(model.parameters())
    x = torch.as_tensor(np.asarray(features), dtype=param.dtype, device=param.device)
    a, d, _ = model_internals(model, x)
    frame = modulation_factor(a, d, labels)
    frame.insert(0, "slide_id", str(getattr(bag, "slide_id", "")))
    frame["alpha"] = model_alpha(model)
    return frame


def eq17_model_residual(aggregator: torch.nn.Module, features: Any) -> float:
    """Eq. 17 on a model's own internals, in float64 (a copy of the model is cast): max over heads and instances of
    |attention - softmax(a) e^Δ / Σ_k softmax(a)_k e^Δ_k| with a, Δ from ``extras`` (spec invariant 9). ~1e-16.

    features: ``[N, D]`` or ``[1, N, D]`` instance features of one bag.
    """
    import copy

    model64 = copy.deepcopy(aggregator).double()
    x = torch.as_tensor(np.asarray(to_numpy(features)), dtype=torch.float64)
    a, d, attention = model_internals(model64, x)
    a_hat = softmax(a, axis=-1)
    factorised = a_hat * np.exp(d) / np.sum(a_hat * np.exp(d), axis=-1, keepdims=True)
    return float(np.max(np.abs(attention - factorised)))
