"""The one model interface and the one registry (DESIGN.md "Interfaces").

Every aggregator is called as ``model(x, coords=None, mask=None) -> MILOutput`` with
``x: [B, N, D]`` instance features (or ``[B, N, 3, H, W]`` images for end-to-end models),
``coords: [B, N, 2]`` level-0 pixel coordinates and ``mask: [B, N]`` (True = real instance,
False = padding). ``build_model(name, in_dim, n_out, **kwargs)`` is the one door, as timm's
``create_model``: paper presets are registered as named variants next to their code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class MILOutput:
    """What every model returns.

    logits: ``[B, n_out]``.
    attention: ``[B, heads, N]`` post-normalisation weights that sum to 1 over the real instances
        (zero on padding), or ``None`` for models without attention.
    aux_losses: named auxiliary losses (e.g. CLAM's instance loss), added to the task loss by the trainer.
    extras: anything else an analysis needs (instance scores, pre-softmax logits, embeddings).
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class of the zoo: ``forward(x, coords=None, mask=None) -> MILOutput``.

    Class attributes the trainers and tests read: ``needs_targets`` (the forward takes ``targets=`` for a
    label-driven auxiliary loss, e.g. CLAM), ``permutation_invariant`` (False for models with positions, e.g.
    TransMIL's PPEG).
    """

    needs_targets: bool = False
    permutation_invariant: bool = True


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PRESETS: dict[str, tuple[str, dict]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model constructor ``fn(in_dim, n_out, **kwargs) -> nn.Module`` under ``name``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY or name in _PRESETS:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def register_preset(name: str, base: str, **kwargs) -> None:
    """Register a named variant: ``build_model(name, ...)`` == ``build_model(base, ..., **kwargs)``."""
    if name in _REGISTRY or name in _PRESETS:
        raise ValueError(f"model name {name!r} is registered twice")
    _PRESETS[name] = (base, kwargs)


def list_models() -> list[str]:
    _import_zoo()
    return sorted([*_REGISTRY, *_PRESETS])


def build_model(name: str, in_dim: int, n_out: int, **kwargs) -> nn.Module:
    """Build a registered model. Unknown names fail with the list of known ones."""
    _import_zoo()
    if name in _PRESETS:
        base, preset_kwargs = _PRESETS[name]
        return build_model(base, in_dim, n_out, **{**preset_kwargs, **kwargs})
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name](in_dim=in_dim, n_out=n_out, **kwargs)


def _import_zoo() -> None:
    import milstudy.models  # noqa: F401  (importing the package registers every model)


def combined_loss(output: MILOutput, task_loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``logits_weight * task_loss(logits) + Σ w * task_loss(stream) + Σ aux_losses`` (see :class:`MILOutput`)."""
    loss = getattr(output, "logits_weight", 1.0) * task_loss(output.logits)
    for logits, weight in getattr(output, "loss_streams", {}).values():
        loss = loss + weight * task_loss(logits)
    for aux in output.aux_losses.values():
        loss = loss + aux.float()
    return loss
