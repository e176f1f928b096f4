"""The one training loop: ``fit(step, config) -> FitResult`` (DESIGN.md "Run"; STYLE.md: one loop owns epochs,
selection, checkpoints, resume and DDP; a training path supplies only a small *step*).

A step (:class:`TrainingStep`) says which batches an epoch visits, what the loss of a batch is, how a split is
evaluated and what it adds to a checkpoint. The loop reads top to bottom:

1. Optimizer (Adam/AdamW over the parameters with ``requires_grad``), AMP scaler (CUDA only), weight EMA, and, when
   ``config.checkpoint_dir`` holds one, the latest checkpoint (a checkpoint of another config is refused, naming
   the fields). Epochs are numbered from 1; epoch 0 is "before training" (attention snapshot 0).
2. Each epoch: for every batch of ``step.batches(state)`` the lr is set (cosine or constant, with linear warmup,
   per step or per epoch), the step's loss is computed under autocast, a non-finite loss stops training with an
   error naming the batch, then backward, clipping, optimizer step, EMA update and ``model.after_optimizer_step()``.
   After the last batch: ``step.end_epoch`` (e.g. DDP buffer sync) and ``model.on_epoch_end(epoch)``.
3. Validation only: the monitored metric (the task's primary metric unless ``config.monitor`` names another)
   selects the best epoch - a strictly better value, or an equal value with a strictly lower validation loss.
   Early stopping (upstream's rule): stop once ``patience`` epochs in a row brought no strictly better value
   (a tie counts as no improvement) and at least ``min_epochs`` epochs have run. Under DDP rank 0 decides and
   broadcasts, so every rank stops together.
4. After training the test split (if any) is scored at the last epoch and with the selected weights; the model
   ends with the selected weights.

Steps: ``milstudy.train.two_stage.BagStep`` (feature bags) and ``milstudy.train.e2e.E2EStep`` (sampled patches,
encoder + aggregator). A new training path (a memory bank, a contrastive step) is a new step; ``fit`` names none.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from milstudy.train import checkpoint as ckpt
from milstudy.train import distributed as dist_utils
from milstudy.train.config import LoopConfig, resolve_device  # noqa: F401 (part of the loop's API)
from milstudy.train.optim import (EMA, build_optimizer, cosine_schedule, lr_multiplier,  # noqa: F401
                                  seed_everything, trainable_parameters)

log = logging.getLogger("milstudy.train")


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class EvalResult:
    """One pass over a split: mean task loss, metrics, per-slide predictions (``slide_id, split``, target and
    prediction columns), attention ``{slide_id: [heads, N]}``, optional features ``{slide_id: [N, D]}`` and the
    slides that could not be read."""

    loss: float
    metrics: dict[str, float]
    predictions: pd.DataFrame
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class FitResult:
    """What ``fit`` returns for every training path.

    ``history``: one row per epoch (``epoch`` from 1, ``lr``, ``train_loss``, ``train_aux_loss``, the step's own
    columns, ``val_*``, ``train_time`` (training part of the epoch, s) and ``time`` (whole epoch, s)). The metrics,
    ``predictions`` and ``attention`` are those of ``best_epoch`` (selected on validation; the last epoch without a
    validation split); ``test_metrics_last`` is the last epoch's test score. ``attention_snapshots[epoch]``
    (0 = before training). ``model`` is the trained model (selected weights) when the caller keeps it.
    """

    history: pd.DataFrame
    best_epoch: int
    monitor: str
    val_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    test_metrics_last: dict[str, float] | None
    predictions: pd.DataFrame
    attention: dict[str, np.ndarray]
    attention_snapshots: dict[int, dict[str, np.ndarray]]
    wall_time: float
    config: dict[str, Any]
    train_time: float = 0.0
    val_metrics_ema: dict[str, float] | None = None
    test_metrics_ema: dict[str, float] | None = None
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    task: Any = None
    skipped_slides: list[str] = field(default_factory=list)
    model: nn.Module | None = None

    @property
    def n_skipped(self) -> int:
        return len(self.skipped_slides)


@dataclass
class EpochState:
    """What per-epoch callbacks receive: the epoch (1-based), the unwrapped model in eval mode on the training
    device, the epoch's history row, its attention snapshot (``{}`` if none) and the run's config."""

    epoch: int
    model: nn.Module
    row: dict[str, Any]
    snapshot: dict[str, np.ndarray]
    config: LoopConfig


@dataclass
class LoopState:
    """The loop's state that a step may read (never replace): model, optimizer, scaler, EMA, device, the current
    epoch (1-based) and the number of optimisation steps taken so far."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: "EMA | None"
    device: torch.device
    config: LoopConfig
    dist: dist_utils.DistInfo
    epoch: int = 0
    step: int = 0


@dataclass
class StepLoss:
    """A batch's loss: ``loss`` (what is backpropagated: task loss + weighted extra streams + auxiliary losses),
    ``aux`` (the auxiliary part, for the history) and ``items`` (bags or slides in the batch)."""

    loss: torch.Tensor
    aux: float = 0.0
    items: int = 1


class TrainingStep(Protocol):
    """What a training path gives ``fit``.

    ``model``: the unwrapped model being trained (optimised, checkpointed, selected). ``task``: the fitted task.
    ``device``: where it trains. ``ema_decay``: the EMA decay this path needs (None = ``config.ema_decay``).
    """

    model: nn.Module
    task: Any
    device: torch.device
    ema_decay: float | None

    def prepare(self, state: LoopState) -> None:
        """Called once the optimizer, EMA and resumed weights exist (e.g. wrap the model in DDP)."""

    def batches(self, state: LoopState) -> Iterable[Any]:
        """The training batches of ``state.epoch``, in order (deterministic given the seed and the epoch)."""

    def loss(self, batch: Any, state: LoopState) -> StepLoss:
        """Forward pass and loss of one batch (the loop runs it under autocast)."""

    def describe(self, batch: Any) -> str:
        """A few words naming the batch, for error messages (e.g. its slide ids)."""

    def end_epoch(self, state: LoopState) -> dict[str, Any]:
        """After the last batch of an epoch; returns columns for the epoch's history row."""

    def evaluate(self, split: str, model: nn.Module, with_attention: bool) -> EvalResult | None:
        """Score ``model`` on ``split`` ("val" | "test") in eval mode; None when the run has no such split."""

    def snapshot(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Eval-mode attention ``{slide_id: [heads, N]}`` of the snapshot slides ({} when there are none)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state the step adds to a checkpoint (e.g. the slides skipped so far)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` on resume."""


def task_loss(task: Any, output: Any, targets: torch.Tensor) -> StepLoss:
    """The loss of one batch: the task loss on ``output.logits`` (weight ``output.logits_weight``, default 1) plus
    the task loss on each extra logit stream ``output.loss_streams`` (e.g. DSMIL's max-instance stream) with its
    weight, plus every auxiliary loss (``output.aux_losses``, e.g. CLAM's instance loss)."""
    from milstudy.models.base import combined_loss

    loss = combined_loss(output, lambda logits: task.loss(logits.float(), targets))
    aux = sum(float(v.detach()) for v in output.aux_losses.values())
    return StepLoss(loss, aux, int(output.logits.shape[0]))


def is_better(value: float, loss: float, best_value: float | None, best_loss: float | None, mode: str) -> bool:
    """Selection rule: a strictly better monitored value, or an equal value with a strictly lower validation loss.
    Non-finite values never win."""
    if not np.isfinite(value):
        return False
    if best_value is None or not np.isfinite(best_value):
        return True
    if value == best_value:
        return best_loss is None or loss < best_loss
    return value > best_value if mode == "max" else value < best_value


def _strictly_better(value: float, best_value: float | None, mode: str) -> bool:
    if not np.isfinite(value):
        return False
    if best_value is None or not np.isfinite(best_value):
        return True
    return value > best_value if mode == "max" else value < best_value


def _call_hook(model: nn.Module, name: str, *args: Any) -> None:
    hook = getattr(model, name, None)
    if callable(hook):
        hook(*args)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=enabled and device.type == "cuda")


def _plain(config: LoopConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=str))  # tuples -> lists, as stored


# ---------------------------------------------------------------------------------------------------- the loop
def fit(step: TrainingStep, config: LoopConfig, callbacks: Sequence[Callable[[EpochState], None]] = (),
        keep_model: bool = False) -> FitResult:
    """Train ``step.model`` on the step's batches, select on its validation split, score its test split once
    training has ended (module docstring). Seed the RNGs before building the step for a reproducible run.

    ``callbacks`` run after every epoch with an :class:`EpochState`. ``keep_model``: return the model in
    ``FitResult.model``.
    """
    started = time.perf_counter()
    dist = dist_utils.current()
    model, task, device = step.model, step.task, step.device
    optimizer = build_optimizer(trainable_parameters(model), config)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema_decay = step.ema_decay or config.ema_decay
    ema = EMA(model, ema_decay) if ema_decay else None
    state = LoopState(model, optimizer, scaler, ema, device, config, dist)
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    monitor = task.primary_metric if config.monitor == "auto" else config.monitor
    mode = task.metric_mode(monitor)

    history: list[dict[str, Any]] = []
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    best = {"epoch": 0, "value": None, "loss": None, "stale": 0}
    best_state: dict[str, torch.Tensor] | None = None
    train_time, stopped, start_epoch = 0.0, False, 1
    latest = ckpt.latest_checkpoint(checkpoint_dir) if config.resume else None
    if latest is not None:
        saved, optimizer_state, extra = ckpt.load_training_checkpoint(latest, model, ema.module if ema else None)
        current, stored = _plain(config), saved.get("config", {})
        differ = sorted(k for k in current if k not in LoopConfig.RUNTIME_FIELDS and stored.get(k) != current[k])
        if differ:
            detail = ", ".join(f"{k}: {stored.get(k)!r} -> {current[k]!r}" for k in differ[:6])
            raise ValueError(f"{latest}: the checkpoint was written with another config ({detail}); use a new "
                             f"checkpoint_dir, or resume=False to start over")
        ckpt.restore_optimizer(optimizer_state, optimizer, scaler)
        history, best, train_time, stopped = saved["history"], saved["best"], saved["train_time"], saved["stopped"]
        state.step, start_epoch = saved["step"], saved["epoch"] + 1
        step.load_state_dict(saved.get("step_state", {}))
        snapshots = ckpt.snapshots_from_tensors(extra.get("snapshots", {}))
        if best["epoch"] > 0:
            best_state = ckpt.load_best_state(checkpoint_dir, model)
        log.info("resuming from %s (epoch %d done)", latest, saved["epoch"])
    elif config.snapshot_slides and config.snapshot_every > 0:
        snapshots[0] = step.snapshot(model)
    step.prepare(state)
    steps_per_epoch = max(1, int(getattr(step, "steps_per_epoch", 1)))

    bar = tqdm(range(start_epoch, config.epochs + 1), desc="epochs", disable=config.quiet or not dist.is_main,
               leave=False, initial=start_epoch - 1, total=config.epochs)
    for epoch in bar if not stopped else ():
        state.epoch = epoch
        epoch_start = time.perf_counter()
        model.train()
        losses, aux_total = [], 0.0
        for batch in step.batches(state):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_multiplier(config, state.step, epoch, steps_per_epoch)
            try:
                with _autocast(device, use_amp):
                    out = step.loss(batch, state)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(
                        f"epoch {epoch}: the loss is {float(out.loss.detach())} on {step.describe(batch)}; lower lr (now "
                        f"{config.lr}), set grad_clip, or check these bags for non-finite features")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            except RuntimeError as error:
                if _is_oom(error) and hasattr(step, "oom_message"):
                    raise RuntimeError(step.oom_message(f"training epoch {epoch}")) from error
                raise
            if ema is not None:
                ema.update(model)
            _call_hook(model, "after_optimizer_step")
            losses.append(float(out.loss.detach()))
            aux_total += out.aux
            state.step += 1
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": float(np.mean(losses)) if losses else float("nan"),
                               "train_aux_loss": aux_total / max(1, len(losses))}
        row.update(step.end_epoch(state))
        _call_hook(model, "on_epoch_end", epoch)
        row["train_time"] = time.perf_counter() - epoch_start
        train_time += row["train_time"]

        val = step.evaluate("val", model, False)
        if val is not None:
            row.update({"val_loss": val.loss, **{f"val_{k}": v for k, v in val.metrics.items()}})
            if ema is not None:
                val_ema = step.evaluate("val", ema.module, False)
                row.update({"val_ema_loss": val_ema.loss, **{f"val_ema_{k}": v for k, v in val_ema.metrics.items()}})
            value = val.loss if monitor == "loss" else val.metrics.get(monitor)
            if value is None:
                raise KeyError(f"monitor {monitor!r} is not a validation metric; available: loss, {sorted(val.metrics)}")
            stale = 0 if _strictly_better(value, best["value"], mode) else best["stale"] + 1
            if is_better(value, val.loss, best["value"], best["loss"], mode) or (best["epoch"] == 0 and epoch == config.epochs):
                best = {"epoch": epoch, "value": float(value), "loss": float(val.loss), "stale": stale}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if checkpoint_dir is not None and dist.is_main:
                    ckpt.save_best(checkpoint_dir, best_state, epoch, float(value))
            else:
                best["stale"] = stale
        else:  # no validation split: the last epoch is the result
            best = {"epoch": epoch, "value": None, "loss": None, "stale": 0}
            best_state = None
        snapshot: dict[str, np.ndarray] = {}
        if config.snapshot_slides and config.snapshot_every > 0 and epoch % config.snapshot_every == 0:
            snapshot = snapshots[epoch] = step.snapshot(model)
        row["time"] = time.perf_counter() - epoch_start
        history.append(row)
        if val is not None:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", **{f"val_{monitor}": f"{value:.3f}"})
        if config.log_every and epoch % config.log_every == 0 and dist.is_main:
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if callbacks:
            model.eval()
            for callback in callbacks:
                callback(EpochState(epoch, model, row, snapshot, config))
        stopped = config.patience is not None and best["stale"] >= config.patience and epoch >= config.min_epochs
        if dist.enabled:
            stopped = dist_utils.broadcast_flag(stopped)
        if checkpoint_dir is not None and dist.is_main and (
                epoch % config.checkpoint_every == 0 or epoch == config.epochs or stopped):
            saved_state = {"config": _plain(config), "history": history, "best": best, "train_time": train_time,
                           "step": state.step, "stopped": stopped, "step_state": step.state_dict()}
            ckpt.save_training_checkpoint(checkpoint_dir, epoch, model, ckpt.optimizer_state(optimizer, scaler),
                                          saved_state, ema.module if ema is not None else None,
                                          {"snapshots": ckpt.snapshots_to_tensors(snapshots)})
        if stopped:
            break
    bar.close()

    # ---- after training: test at the last epoch, the EMA model, then the selected (best validation) weights
    last_is_best = best_state is None or (history and best["epoch"] == history[-1]["epoch"])
    test_last = None if last_is_best else step.evaluate("test", model, False)
    val_ema = test_ema = None
    if ema is not None:
        val_ema, test_ema = (step.evaluate(split, ema.module, False) for split in ("val", "test"))
    if best_state is not None:
        model.load_state_dict(best_state)
    val_best = step.evaluate("val", model, config.save_attention)
    test_best = step.evaluate("test", model, config.save_attention)
    if last_is_best:
        test_last = test_best
    frames, attention = [], {}
    for out in (val_best, test_best):
        if out is not None and len(out.predictions):
            frames.append(out.predictions)
            attention.update(out.attention)
    skipped = list(getattr(step, "skipped", []))
    for out in (val_best, test_best):
        skipped += out.skipped if out is not None else []
    return FitResult(
        history=pd.DataFrame(history),
        best_epoch=int(best["epoch"]),
        monitor=monitor,
        val_metrics=val_best.metrics if val_best is not None else {},
        test_metrics=test_best.metrics if test_best is not None else None,
        test_metrics_last=test_last.metrics if test_last is not None else None,
        predictions=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        attention=attention,
        attention_snapshots=snapshots,
        wall_time=time.perf_counter() - started,
        config=config.to_dict(),
        train_time=train_time,
        val_metrics_ema=val_ema.metrics if val_ema is not None else None,
        test_metrics_ema=test_ema.metrics if test_ema is not None else None,
        best_checkpoint=(checkpoint_dir / "best" / "model.safetensors")
        if checkpoint_dir is not None and best_state is not None else None,
        stopped_early=bool(stopped),
        task=task,
        skipped_slides=skipped,
        model=model if keep_model else None,
    )
