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
    """What every model returns (DESIGN.md "Interfaces"; B bags, N instances, C = n_out).

    logits: ``[B, C]``, the prediction.
    attention: ``[B, heads, N]`` post-normalisation weights that sum to 1 over the real instances of each head
        (exactly 0 on padding), or ``None`` for models without attention (max pooling). Attention stays per head
        (per class for DSMIL, per query token for models with several queries); analyses take the head mean.
    attention_logits: ``[B, heads, N]`` the pre-normalisation scores that the model's softmax normalises, with
        gradient (never detached), such that ``masked_softmax(attention_logits, mask) == attention``; padded
        positions hold exactly ``PAD_LOGIT`` (-1e4, finite, so that products with a zero weight and
        ``log_softmax`` stay finite; ``torch.softmax`` without the mask already gives them weight 0 in float32
        and float64). ``None`` where ``attention`` is ``None`` and for mean pooling, whose uniform weights no
        score produces. This is what an attention anchor (ASMIL, spec asmil.md §2.3 / §2.8) regularises.
    aux_losses: named auxiliary losses (e.g. CLAM's instance loss), added unweighted to the task loss.
    loss_streams: extra logits ``[B, C]`` on which the trainer applies the TASK loss, each with its weight,
        e.g. DSMIL's max-instance stream ``{"max_instance": (max_logits, 0.5)}``. Empty for most models.
    logits_weight: weight of the task loss on ``logits`` (1.0 for most models; DSMIL 0.5). The total training
        loss is ``combined_loss(output, task_loss)``.
    extras: anything else an analysis needs (instance scores, embeddings, decompositions of the logits).
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    attention_logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_streams: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    logits_weight: float = 1.0


def combined_loss(output: MILOutput, task_loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The training loss of one forward: the task loss on every stream of logits plus the auxiliary losses.

    ``logits_weight * task_loss(logits) + Σ_s w_s * task_loss(logits_s) + Σ aux_losses``, where
    ``task_loss(logits [B, C]) -> scalar`` closes over the targets (e.g. ``lambda z: task.loss(z, targets)``) and
    ``(logits_s, w_s)`` are ``output.loss_streams``. With the defaults (weight 1, no streams) this is exactly
    ``task_loss(logits) + Σ aux_losses``. A zero ``logits_weight`` skips the term (the logits are then prediction
    only, as DSMIL's ``predict="mean"``).
    """
    if not isinstance(output, MILOutput):
        raise TypeError(f"combined_loss: output must be a MILOutput, got {type(output).__name__}")
    terms: list[torch.Tensor] = []
    if output.logits_weight == 1.0:
        terms.append(task_loss(output.logits))
    elif output.logits_weight != 0.0:
        terms.append(output.logits_weight * task_loss(output.logits))
    for name, (stream_logits, weight) in output.loss_streams.items():
        if stream_logits.shape != output.logits.shape:
            raise ValueError(
                f"combined_loss: loss_streams[{name!r}] has shape {tuple(stream_logits.shape)}, "
                f"expected the logits' shape {tuple(output.logits.shape)}"
            )
        terms.append(weight * task_loss(stream_logits))
    terms.extend(output.aux_losses.values())
    if not terms:
        raise ValueError("combined_loss: logits_weight is 0 and there are no loss streams or auxiliary losses")
    loss = terms[0]
    for term in terms[1:]:
        loss = loss + term
    return loss


class MILModel(nn.Module):
    """Base class of the zoo: ``forward(x, coords=None, mask=None) -> MILOutput``.

    Class attributes the trainers and tests read: ``needs_targets`` (the forward takes ``targets=`` for a
    label-driven auxiliary loss, e.g. CLAM), ``permutation_invariant`` (False for models with positions, e.g.
    TransMIL's PPEG), ``needs_coords`` (the forward uses patch coordinates: the trainers refuse bags without
    them, e.g. CLAM ``pt_files``, instead of passing zeros).

    Training hooks, no-ops here: every training path calls ``after_optimizer_step()`` right after each optimizer
    step and ``on_epoch_end(epoch)`` at the end of each epoch (1-based). An EMA anchor (ASMIL, spec asmil.md §2.3:
    θ̃ ← βθ̃ + (1-β)θ after every step) lives there.
    """

    needs_targets: bool = False
    permutation_invariant: bool = True
    needs_coords: bool = False

    def after_optimizer_step(self) -> None:
        """Called by every training path right after each optimizer step (default: nothing)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called by every training path at the end of each epoch, ``epoch`` counted from 1 (default: nothing)."""


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
