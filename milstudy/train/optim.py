"""Optimisation pieces of the one loop (:mod:`milstudy.train.loop`): seeding, Adam/AdamW over the trainable
parameters, the cosine / constant schedule with linear warmup, and the weight EMA."""

from __future__ import annotations

import copy
import math
import random
from typing import Iterable

import numpy as np
import torch
from torch import nn

from milstudy.train.config import LoopConfig


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], config: LoopConfig) -> torch.optim.Optimizer:
    """Adam or AdamW from ``config`` (lr, weight_decay, betas)."""
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # foreach: one fused kernel per step over all parameters (PyTorch only enables it by default on CUDA)
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas), foreach=True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer gets: those with ``requires_grad`` (frozen encoders and EMA anchors stay out)."""
    return [p for p in model.parameters() if p.requires_grad]


def cosine_schedule(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based): linear warmup ``(step+1)/warmup_steps``, then a half cosine from 1 to
    ``min_ratio`` reached at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(config: LoopConfig, step: int, epoch: int, steps_per_epoch: int) -> float:
    """The schedule's multiplier before optimisation step ``step`` (0-based, counted over the run) of ``epoch``
    (1-based): its unit index is ``step`` (schedule_unit "step") or ``epoch - 1`` ("epoch")."""
    per_unit = steps_per_epoch if config.schedule_unit == "step" else 1
    unit = step if config.schedule_unit == "step" else epoch - 1
    warmup = int(round(config.warmup_epochs * per_unit))
    if config.schedule == "constant":
        return min(1.0, (unit + 1) / warmup) if warmup > 0 else 1.0
    return cosine_schedule(unit, per_unit * config.epochs, warmup, config.min_lr_ratio)


class EMA:
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * weights``.

    Floating-point parameters and buffers are averaged; integer buffers (e.g. BatchNorm counters) are copied.
    ``ema.module`` is an eval-mode copy to evaluate like any model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(self.decay).add_(source[name].detach(), alpha=1.0 - self.decay)
            else:
                value.copy_(source[name])
