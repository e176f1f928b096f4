"""Two-stage MIL trainer: a MIL model on precomputed feature bags (DESIGN.md "Run"; specs/abmilx.md §2.7, §3.4-3.7).

``train_two_stage(model, task, train_ds, val_ds, test_ds, config) -> RunResult`` reads top to bottom:

1. The task is fitted to the training targets (survival bins, class weights; labels checked for every split).
2. Each epoch visits the training bags (optionally class-balanced oversampled, ``sampling.py``) in an order drawn
   from a generator seeded by ``(seed, epoch)``; batch 1 feeds variable-size bags as they are, batch > 1 pads and
   masks them (``milstudy.data.bags.collate_bags``). Loss = task loss + every ``MILOutput.aux_losses`` term.
   Adam/AdamW, cosine schedule with linear warmup (updated per optimisation step by default, or per epoch),
   gradient clipping, AMP (CUDA only) and an optional weight EMA (evaluated as a secondary model).
3. After each epoch the model is scored on the **validation** split only; model selection and early stopping use
   the monitored validation metric (ties broken by the lower validation loss). The test split is never read during
   training: it is evaluated once training has ended, at the best and at the last epoch.
4. Checkpoints (``checkpoint.py``) hold weights, optimizer, RNG states and history, so resuming from the latest one
   reproduces an uninterrupted run exactly on CPU.

The reusable pieces (``build_optimizer``, ``cosine_schedule``, ``EMA``, ``evaluate``, ``seed_everything``) are also
used by the end-to-end trainer.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from milstudy.train import checkpoint as ckpt
from milstudy.train.sampling import oversample_indices
from milstudy.train.tasks import ClassificationTask, Task


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """Everything a two-stage run depends on (defaults: specs/abmilx.md §5.5, profile S).

    optimizer: "adamw" | "adam"; lr, weight_decay, betas.
    epochs: maximum number of epochs; warmup_epochs: linear warmup length (epochs, may be fractional).
    schedule: "cosine" | "constant"; schedule_unit: "step" (lr updated every optimisation step) | "epoch";
        min_lr_ratio: final lr as a fraction of lr.
    grad_clip: max global gradient norm (None = off). amp: fp16 autocast + GradScaler, used only on CUDA.
    ema_decay: weight EMA decay (e.g. 0.9997) or None; the EMA model is evaluated as a secondary model.
    monitor: validation metric for model selection / early stopping: "auto" (the task's primary metric), "loss",
        or a metric name ("accuracy", "auc", "qwk", "c_index", ...).
    patience: stop after this many epochs without improvement (None = never); min_epochs: never stop before it.
    batch_size: 1 = variable bags as they are; > 1 = padding + mask. eval_batch_size likewise for evaluation.
    oversample: None, or the majority:minority ratio to top minority classes up to (2.0 = 2:1, 1.0 = balanced).
    seed: seeds python/numpy/torch at the start and the per-epoch shuffling.
    device: "cpu", "cuda", "cuda:1", ... ; checkpoint_dir: None = keep the best weights in memory only;
        resume: continue from the latest checkpoint in checkpoint_dir if there is one; checkpoint_every: epochs.
    attention_snapshot_slides: slide ids whose attention is recorded during training (any split: only features are
        read, never labels); snapshot_every: epochs between snapshots (epoch 0 = before training).
    save_attention: keep per-slide attention of the evaluated splits at the best epoch.
    num_workers: DataLoader workers; quiet: no progress bar; log_every: print a history line every n epochs (0 off).
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
    batch_size: int = 1
    eval_batch_size: int = 1
    oversample: float | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | Path | None = None
    resume: bool = True
    checkpoint_every: int = 1
    attention_snapshot_slides: Sequence[str] = ()
    snapshot_every: int = 1
    save_attention: bool = True
    num_workers: int = 0
    quiet: bool = False
    log_every: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"TrainConfig.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.schedule_unit not in ("step", "epoch"):
            raise ValueError(f"TrainConfig.schedule_unit must be 'step' or 'epoch', got {self.schedule_unit!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("TrainConfig: epochs, batch_size and eval_batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint_dir"] = str(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        out["attention_snapshot_slides"] = list(self.attention_snapshot_slides)
        out["betas"] = list(self.betas)
        return out


@dataclass
class EvalResult:
    """One pass over a split: mean loss, metrics, per-slide predictions and attention ``{slide_id: [heads, N]}``."""

    loss: float
    metrics: dict[str, float]
    predictions: pd.DataFrame
    attention: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class FitResult:
    """What every trainer returns: the two-stage :func:`train_two_stage` and the end-to-end ``train_e2e``.

    ``history`` has one row per epoch; the metrics, ``predictions`` and ``attention`` are those of the epoch
    selected on validation (``best_epoch`` by ``monitor``); ``test_metrics_last`` is the last epoch's test score.
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
    val_metrics_ema: dict[str, float] | None = None
    test_metrics_ema: dict[str, float] | None = None


@dataclass
class RunResult(FitResult):
    """A two-stage run (the model passed in holds the best-epoch weights afterwards)."""

    best_checkpoint: Path | None = None
    stopped_early: bool = False
    task: Task | None = None


# ------------------------------------------------------------------------------------------- reusable pieces
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW from ``config`` (lr, weight_decay, betas)."""
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # foreach: one fused kernel per step over all parameters (PyTorch only enables it by default on CUDA)
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas), foreach=True)


def cosine_schedule(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based): linear warmup ``(step+1)/warmup_steps``, then a half cosine from 1 to
    ``min_ratio`` reached at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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


# ----------------------------------------------------------------------------------------------- bag plumbing
def bag_targets(dataset: Dataset) -> tuple[list[str], list[Any]]:
    """Slide ids and raw targets of every bag; uses ``dataset.slide_ids``/``dataset.targets`` when the dataset
    offers them (no feature loading), otherwise reads every bag."""
    ids = getattr(dataset, "slide_ids", None)
    targets = getattr(dataset, "targets", None)
    if ids is not None and targets is not None and not callable(ids) and not callable(targets):
        return [str(i) for i in ids], list(targets)
    bags = [dataset[i] for i in range(len(dataset))]
    return [str(b.slide_id) for b in bags], [b.target for b in bags]


def _identity(bags: list) -> list:
    return bags


def _to_batch(bags: list, device: torch.device) -> dict[str, Any]:
    """Bags -> tensors on ``device``: ``features [B,N,D]``, ``coords [B,N,2]`` or None, ``mask [B,N]`` or None."""
    if len(bags) == 1:
        bag = bags[0]
        features = torch.as_tensor(bag.features, dtype=torch.float32).unsqueeze(0)
        coords = None if bag.coords is None else torch.as_tensor(bag.coords).unsqueeze(0)
        mask = None
    else:
        from milstudy.data.bags import collate_bags

        batch = collate_bags(bags)
        features, coords, mask = batch["features"], batch.get("coords"), batch["mask"]
    return {
        "features": features.to(device, non_blocking=True),
        "coords": None if coords is None else coords.to(device, non_blocking=True),
        "mask": None if mask is None else mask.to(device, non_blocking=True),
        "slide_ids": [str(b.slide_id) for b in bags],
        "raw_targets": [b.target for b in bags],
    }


def _are_class_indices(targets: torch.Tensor) -> bool:
    return targets.ndim == 1 and not targets.dtype.is_floating_point


def _forward(model: nn.Module, batch: dict[str, Any], targets: torch.Tensor | None):
    in_dim = getattr(model, "in_dim", None)
    if isinstance(in_dim, int) and batch["features"].shape[-1] != in_dim:
        raise ValueError(
            f"slides {batch['slide_ids'][:3]}: feature dimension {batch['features'].shape[-1]} does not match the "
            f"model's in_dim {in_dim}; build the model with in_dim={batch['features'].shape[-1]}"
        )
    kwargs: dict[str, Any] = {"coords": batch["coords"], "mask": batch["mask"]}
    # Models with label-driven auxiliary losses (CLAM's instance loss) get the bag labels when the task has class
    # labels; survival targets (time, event) have no classes, so such models train on the task loss alone.
    if getattr(model, "needs_targets", False) and targets is not None and _are_class_indices(targets):
        kwargs["targets"] = targets
    return model(batch["features"], **kwargs)


def _loader(dataset: Dataset, indices: Sequence[int] | None, batch_size: int, num_workers: int) -> DataLoader:
    subset = dataset if indices is None else Subset(dataset, list(map(int, indices)))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=_identity, num_workers=num_workers)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    dataset: Dataset,
    split: str = "val",
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    amp: bool = False,
    with_attention: bool = True,
    num_workers: int = 0,
) -> EvalResult:
    """Score ``model`` on every bag of ``dataset`` in eval mode.

    The loss is the task loss over the whole split at once (identical to the per-slide mean for cross-entropy and
    NLL; the Cox loss needs the whole risk set), auxiliary losses excluded. Returns metrics, a predictions DataFrame
    (``slide_id, split,`` target columns, prediction columns) and, if asked, attention ``{slide_id: [heads, N]}``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    logits_all, targets_all, ids_all = [], [], []
    attention: dict[str, np.ndarray] = {}
    for bags in _loader(dataset, None, batch_size, num_workers):
        batch = _to_batch(bags, device)
        targets = task.make_targets(batch["raw_targets"], batch["slide_ids"])
        with _autocast(device, amp):
            output = _forward(model, batch, None)
        logits_all.append(output.logits.float().cpu())
        targets_all.append(targets)
        ids_all.extend(batch["slide_ids"])
        if with_attention and output.attention is not None:
            att = output.attention.float().cpu().numpy()
            for row, slide_id in enumerate(batch["slide_ids"]):
                real = slice(None) if batch["mask"] is None else batch["mask"][row].cpu().numpy()
                attention[slide_id] = att[row][:, real]
    model.train(was_training)
    logits = torch.cat(logits_all)
    targets = torch.cat(targets_all)
    loss = float(task.loss(logits, targets)) if len(logits) else float("nan")
    predictions = task.predict(logits)
    metrics = task.metrics(predictions, targets)
    frame = pd.DataFrame({"slide_id": ids_all, "split": split, **task.target_columns(targets),
                          **task.prediction_columns(predictions)})
    return EvalResult(loss, metrics, frame, attention)


@torch.no_grad()
def attention_of(model: nn.Module, bags: Sequence[Any], device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Eval-mode attention ``{slide_id: [heads, N]}`` of ``bags`` (one at a time); models without attention give {}."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: dict[str, np.ndarray] = {}
    for bag in bags:
        output = _forward(model, _to_batch([bag], device), None)
        if output.attention is not None:
            out[str(bag.slide_id)] = output.attention[0].float().cpu().numpy()
    model.train(was_training)
    return out


def _find_bags(slide_ids: Sequence[str], datasets: Sequence[Dataset | None]) -> list[Any]:
    wanted, found = [str(s) for s in slide_ids], {}
    for dataset in datasets:
        if dataset is None or len(found) == len(wanted):
            continue
        ids, _ = bag_targets(dataset)
        for index, slide_id in enumerate(ids):
            if slide_id in wanted and slide_id not in found:
                found[slide_id] = dataset[index]
    missing = [s for s in wanted if s not in found]
    if missing:
        raise ValueError(f"attention_snapshot_slides: slides {missing[:5]} are in none of the datasets")
    return [found[s] for s in wanted]


def _better(value: float, loss: float, best_value: float | None, best_loss: float | None, mode: str) -> bool:
    if not np.isfinite(value):
        return False
    if best_value is None or not np.isfinite(best_value):
        return True
    if value == best_value:
        return best_loss is None or loss < best_loss
    return value > best_value if mode == "max" else value < best_value


# ------------------------------------------------------------------------------------------------- the trainer
def train_two_stage(
    model: nn.Module,
    task: Task,
    train_ds: Dataset,
    val_ds: Dataset,
    test_ds: Dataset | None = None,
    config: TrainConfig | None = None,
) -> RunResult:
    """Train ``model`` on ``train_ds`` bags, select on ``val_ds``, score ``test_ds`` after training (module doc).

    Seed the RNGs (``seed_everything``) before building ``model`` for a reproducible initialisation.
    """
    if not isinstance(task, Task):
        raise TypeError(f"train_two_stage(model, task, train_ds, val_ds, test_ds, config): task is {type(task)}")
    config = config or TrainConfig()
    started = time.perf_counter()
    device = torch.device(config.device)
    seed_everything(config.seed)

    train_ids, train_raw = bag_targets(train_ds)
    task = task.prepare(train_raw, train_ids)
    for name, dataset in (("validation", val_ds), ("test", test_ds)):
        if dataset is not None:  # check labels now rather than after hours of training
            ids, raw = bag_targets(dataset)
            task.make_targets(raw, ids)
    if getattr(task, "needs_batches", False) and config.batch_size < 2:
        raise ValueError("the Cox loss compares slides within a batch: set TrainConfig.batch_size >= 2")
    monitor = task.primary_metric if config.monitor == "auto" else config.monitor
    mode = task.metric_mode(monitor)

    indices = np.arange(len(train_ds))
    if config.oversample is not None:
        if not isinstance(task, ClassificationTask):
            raise ValueError("TrainConfig.oversample applies to classification/grading tasks only")
        indices = oversample_indices(task.make_targets(train_raw).numpy(), config.oversample, config.seed)
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)

    model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    snapshot_bags = _find_bags(config.attention_snapshot_slides, (train_ds, val_ds, test_ds))
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None

    history: list[dict[str, Any]] = []
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    best = {"epoch": 0, "value": None, "loss": None, "since": 0}
    best_state: dict[str, torch.Tensor] | None = None
    best_path: Path | None = None
    start_epoch = 1

    latest = ckpt.latest_checkpoint(checkpoint_dir) if config.resume else None
    if latest is not None:
        state, optimizer_state, extra = ckpt.load_training_checkpoint(
            latest, model, ema.module if ema is not None else None
        )
        ckpt.restore_optimizer(optimizer_state, optimizer, scaler)
        history, best = state["history"], state["best"]
        snapshots = ckpt.snapshots_from_tensors(extra.get("snapshots", {}))
        start_epoch = state["epoch"] + 1
        best_path = checkpoint_dir / "best" / "model.safetensors"
        if best["epoch"] > 0:
            best_state = ckpt.load_best_state(checkpoint_dir, model)
    elif snapshot_bags and config.snapshot_every > 0:
        snapshots[0] = attention_of(model, snapshot_bags, device)

    total_steps = steps_per_epoch * config.epochs if config.schedule_unit == "step" else config.epochs
    warmup = config.warmup_epochs * (steps_per_epoch if config.schedule_unit == "step" else 1)
    warmup = int(round(warmup))

    def lr_at(epoch: int, step_in_epoch: int) -> float:
        if config.schedule == "constant":
            step = (epoch - 1) * steps_per_epoch + step_in_epoch
            return config.lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        step = (epoch - 1) * steps_per_epoch + step_in_epoch if config.schedule_unit == "step" else epoch - 1
        return config.lr * cosine_schedule(step, total_steps, warmup, config.min_lr_ratio)

    stopped_early = False
    bar = tqdm(range(start_epoch, config.epochs + 1), desc="epochs", disable=config.quiet, leave=False,
               initial=start_epoch - 1, total=config.epochs)
    for epoch in bar:
        if best["epoch"] > 0 and config.patience is not None and epoch - 1 >= config.min_epochs \
                and best["since"] >= config.patience:
            stopped_early = True
            break
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        losses, aux_total = [], 0.0
        for step, bags in enumerate(_loader(train_ds, indices[order.numpy()], config.batch_size, config.num_workers)):
            set_lr(optimizer, lr_at(epoch, step))
            batch = _to_batch(bags, device)
            targets = task.make_targets(batch["raw_targets"], batch["slide_ids"]).to(device)
            with _autocast(device, use_amp):
                output = _forward(model, batch, targets)
            loss = task.loss(output.logits, targets)
            for aux in output.aux_losses.values():
                loss = loss + aux.float()
                aux_total += float(aux.detach())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: non-finite loss on slides {batch['slide_ids'][:5]}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            losses.append(float(loss.detach()))

        val = evaluate(model, task, val_ds, "val", device, config.eval_batch_size, use_amp, False, config.num_workers)
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                               "train_bags": len(indices), "train_loss": float(np.mean(losses)), "train_aux_loss": aux_total / max(1, len(losses)),
                               "val_loss": val.loss, **{f"val_{k}": v for k, v in val.metrics.items()}}
        if ema is not None:
            val_ema = evaluate(ema.module, task, val_ds, "val", device, config.eval_batch_size, use_amp, False)
            row.update({"val_ema_loss": val_ema.loss, **{f"val_ema_{k}": v for k, v in val_ema.metrics.items()}})
        value = val.loss if monitor == "loss" else val.metrics.get(monitor)
        if value is None:
            raise KeyError(f"monitor {monitor!r} is not a validation metric; available: loss, {sorted(val.metrics)}")
        if _better(value, val.loss, best["value"], best["loss"], mode) or best["epoch"] == 0 and epoch == config.epochs:
            best = {"epoch": epoch, "value": float(value), "loss": float(val.loss), "since": 0}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint_dir is not None:
                best_path = ckpt.save_best(checkpoint_dir, best_state, epoch, float(value))
        else:
            best["since"] += 1
        if snapshot_bags and config.snapshot_every > 0 and epoch % config.snapshot_every == 0:
            snapshots[epoch] = attention_of(model, snapshot_bags, device)
        row["time"] = time.perf_counter() - epoch_start
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **{f"val_{monitor}": f"{value:.3f}"})
        if config.log_every and epoch % config.log_every == 0:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if checkpoint_dir is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
            ckpt.save_training_checkpoint(
                checkpoint_dir, epoch, model, ckpt.optimizer_state(optimizer, scaler), {"history": history, "best": best},
                ema.module if ema is not None else None, {"snapshots": ckpt.snapshots_to_tensors(snapshots)},
            )
    bar.close()

    # ---- after training: test at the last epoch, then the selected (best validation) weights
    evaluate_args = dict(device=device, batch_size=config.eval_batch_size, amp=use_amp, num_workers=config.num_workers)
    test_last = evaluate(model, task, test_ds, "test", with_attention=False, **evaluate_args) if test_ds else None
    val_ema = test_ema = None
    if ema is not None:
        val_ema = evaluate(ema.module, task, val_ds, "val", with_attention=False, **evaluate_args).metrics
        if test_ds is not None:
            test_ema = evaluate(ema.module, task, test_ds, "test", with_attention=False, **evaluate_args).metrics
    if best_state is not None:
        model.load_state_dict(best_state)
    val_best = evaluate(model, task, val_ds, "val", with_attention=config.save_attention, **evaluate_args)
    frames, attention = [val_best.predictions], dict(val_best.attention)
    test_best = None
    if test_ds is not None:
        test_best = evaluate(model, task, test_ds, "test", with_attention=config.save_attention, **evaluate_args)
        frames.append(test_best.predictions)
        attention.update(test_best.attention)
    return RunResult(
        history=pd.DataFrame(history),
        best_epoch=int(best["epoch"]),
        best_checkpoint=best_path,
        monitor=monitor,
        val_metrics=val_best.metrics,
        test_metrics=test_best.metrics if test_best else None,
        test_metrics_last=test_last.metrics if test_last else None,
        predictions=pd.concat(frames, ignore_index=True),
        attention=attention,
        attention_snapshots=snapshots,
        wall_time=time.perf_counter() - started,
        stopped_early=stopped_early,
        task=task,
        config=config.to_dict(),
        val_metrics_ema=val_ema,
        test_metrics_ema=test_ema,
    )
