"""The fields every training path shares (``LoopConfig``) and the device rule; part of the one loop
(:mod:`milstudy.train.loop`). ``TrainConfig`` (two-stage) and ``E2EConfig`` extend ``LoopConfig``."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


@dataclass
class LoopConfig:
    """The fields every training path shares (defaults: specs/abmilx.md §5.5, profile S).

    optimizer: "adamw" | "adam"; lr, weight_decay, betas. epochs: maximum number of epochs.
    warmup_epochs: linear warmup length in epochs (may be fractional). schedule: "cosine" | "constant";
        schedule_unit: "step" (lr updated every optimisation step) | "epoch"; min_lr_ratio: final lr / lr.
    grad_clip: max global gradient norm (None = off). amp: fp16 autocast + GradScaler, used only on CUDA.
    ema_decay: weight EMA (e.g. 0.9997) or None; the EMA model is scored as a secondary model.
    monitor: validation metric for selection / early stopping: "auto" (the task's primary metric), "loss", or a
        metric name. patience: epochs without a strictly better value before stopping (None = never);
        min_epochs: never stop before this many epochs.
    seed: every random draw of the run. device: "auto" (CUDA when present) | "cpu" | "cuda" | "cuda:1".
    checkpoint_dir: where rank 0 writes a checkpoint every ``checkpoint_every`` epochs and the best weights (None
        = best weights kept in memory only); resume: continue from the latest checkpoint there.
    snapshot_slides: slide ids whose eval-mode attention is recorded (epoch 0 and every ``snapshot_every``
        epochs; only features are read, never labels). save_attention: keep per-slide attention of the final
        evaluations. quiet: no progress bar; log_every: log a history line every n epochs (0 = off).
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 30
    warmup_epochs: float = 2.0
    schedule: str = "cosine"
    schedule_unit: str = "step"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    ema_decay: float | None = None
    monitor: str = "auto"
    patience: int | None = None
    min_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | Path | None = None
    resume: bool = True
    checkpoint_every: int = 1
    snapshot_slides: Sequence[str] = ()
    snapshot_every: int = 1
    save_attention: bool = True
    quiet: bool = False
    log_every: int = 0

    # fields that change how a run executes, not what it computes: they may differ on resume
    RUNTIME_FIELDS = ("device", "num_workers", "quiet", "checkpoint_dir", "resume", "checkpoint_every", "log_every",
                      "eval_chunk", "eval_batch_size")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"{name}.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"{name}.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.schedule_unit not in ("step", "epoch"):
            raise ValueError(f"{name}.schedule_unit must be 'step' or 'epoch', got {self.schedule_unit!r}")
        if self.epochs < 1:
            raise ValueError(f"{name}.epochs must be >= 1, got {self.epochs}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"{name}.patience must be >= 1 or None, got {self.patience}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"{name}.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if isinstance(self.snapshot_slides, str):
            raise ValueError(f"{name}.snapshot_slides must be a list of slide ids, not the string "
                             f"{self.snapshot_slides!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint_dir"] = str(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        out["snapshot_slides"] = list(self.snapshot_slides)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """A config from plain values (YAML, JSON); unknown fields are an error listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not _matches(value, hints.get(key)):
                raise ValueError(f"{cls.__name__}.{key} must be {_type_name(hints[key])}, got {value!r}")
        return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain value (from YAML / the command line) fits a simple annotation; other annotations pass."""
    if hint is None or hint is Any:
        return True
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
            return True
        if option is str and isinstance(value, str):
            return True
        if option not in (bool, int, float, str, type(None)):
            return True  # containers, paths, ...: checked where used
    return False


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join("None" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
