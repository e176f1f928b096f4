"""Two-stage MIL: a MIL model trained on precomputed feature bags (DESIGN.md "Run"; specs/abmilx.md §2.7, §3.4-3.7).

``train_two_stage(model, task, train_ds, val_ds, test_ds, config) -> FitResult`` builds a :class:`BagStep` and runs
the one loop (``milstudy.train.loop.fit``: optimizer, schedule, EMA, validation-only selection, early stopping,
checkpoints and exact resume). The step:

- fits the task on the training targets (survival bins, class weights) and checks the labels of every split and
  every bag's features (finite, non-empty; ``milstudy.data.bag_checks.validate_bags``) before training;
- visits the training bags each epoch (optionally class-balanced oversampled, ``oversampling.py``) in an order drawn
  from a generator seeded by ``(seed, epoch)``; batch 1 feeds variable-size bags as they are, batch > 1 pads and
  masks them (``milstudy.data.bags.collate_bags``), optionally in batches of similar length
  (``group_by_length``: less padding where bag sizes vary 10-500x, as in MUSK2);
- optionally keeps a random share of each training bag's instances per epoch (``instance_share``; drawn from
  ``(seed, epoch, slide id)``, so it does not depend on batch composition, rank or resume; evaluation always
  sees whole bags);
- passes ``coords`` and ``mask`` to the model, and the bag labels to models with ``needs_targets`` (CLAM's
  instance loss) when the task has class labels;
- scores a split with :func:`evaluate` (the task loss over the whole split, metrics, predictions, attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from milstudy.data.bag_checks import validate_bags
from milstudy.train.loop import (EvalResult, FitResult, LoopConfig, LoopState, StepLoss, fit, resolve_device,
                                 seed_everything, task_loss)
from milstudy.train.oversampling import oversample_indices
from milstudy.train.tasks import ClassificationTask, Task


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig(LoopConfig):
    """A two-stage run: :class:`~milstudy.train.loop.LoopConfig` (optimisation, selection, checkpoints, device
    "auto" = CUDA when present) plus

    batch_size: 1 = variable bags as they are; > 1 = padding + mask. eval_batch_size likewise for evaluation.
    oversample: None, or the majority:minority ratio to top minority classes up to (2.0 = 2:1, 1.0 = balanced).
    num_workers: DataLoader workers.
    group_by_length: batch > 1 only: each epoch cuts the shuffled order into pools of ``8 * batch_size`` bags, sorts
      each pool by bag length, cuts it into batches and shuffles the batches (the composition still changes every
      epoch; padding shrinks); evaluation batches bags in length order and returns them in dataset order.
    instance_share: None = every instance; a share in (0, 1): each epoch every training bag keeps
      ``max(1, round(share * N))`` of its N instances, uniformly without replacement and in their original order
      (random instance subsampling, a common MIL augmentation and the per-epoch instance noise of ASMIL's notebook
      20); validation, test and attention snapshots see whole bags.
    """

    batch_size: int = 1
    eval_batch_size: int = 1
    oversample: float | None = None
    num_workers: int = 0
    group_by_length: bool = False
    instance_share: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("TrainConfig: batch_size and eval_batch_size must be >= 1")
        if self.instance_share is not None and not 0.0 < float(self.instance_share) < 1.0:
            raise ValueError(f"TrainConfig: instance_share must be None (every instance) or in (0, 1), got "
                             f"{self.instance_share!r}")


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


def subsample_instances(bags: Sequence[Any], share: float, seed: int, epoch: int) -> list:
    """Each bag with ``max(1, round(share * N))`` of its instances, drawn without replacement by a generator seeded
    with ``(seed, epoch, crc32(slide id))`` and kept in their original order (``TrainConfig.instance_share``)."""
    import zlib

    from milstudy.data.instance_sampling import sample_random

    out = []
    for bag in bags:
        rng = np.random.default_rng([seed, epoch, zlib.crc32(str(bag.slide_id).encode())])
        keep = max(1, int(round(share * len(bag))))
        picked = torch.as_tensor(np.sort(sample_random(len(bag), keep, rng, what=f"slide '{bag.slide_id}'")))
        out.append(bag.subset(picked))
    return out


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
    if getattr(model, "needs_coords", False) and batch["coords"] is None:
        raise ValueError(
            f"slides {batch['slide_ids'][:3]}: {type(model).__name__} is position-aware and needs patch coordinates, "
            "but these bags have none (CLAM pt_files/ and plain .pt features carry no coordinates): use CLAM's "
            "h5_files/, TRIDENT's .h5 features or `milstudy features extract`")
    kwargs: dict[str, Any] = {"coords": batch["coords"], "mask": batch["mask"]}
    # Models with label-driven auxiliary losses (CLAM's instance loss) get the bag labels when the task has class
    # labels; survival targets (time, event) have no classes, so such models train on the task loss alone.
    if getattr(model, "needs_targets", False) and targets is not None and _are_class_indices(targets):
        kwargs["targets"] = targets
    return model(batch["features"], **kwargs)


def _loader(dataset: Dataset, indices: Sequence[int] | None, batch_size: int, num_workers: int,
            batches: Sequence[Sequence[int]] | None = None) -> DataLoader:
    """Bags of ``dataset`` (``indices`` in order, or None = all) in batches of ``batch_size``; or, when
    ``batches`` is given, exactly those batches of dataset indices."""
    if batches is not None:
        return DataLoader(dataset, batch_sampler=[list(map(int, b)) for b in batches], collate_fn=_identity,
                          num_workers=num_workers)
    subset = dataset if indices is None else Subset(dataset, list(map(int, indices)))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=_identity, num_workers=num_workers)


def bag_lengths(dataset: Dataset) -> np.ndarray:
    """Instances per bag: ``dataset.n_instances`` when the dataset has it (no feature loading), else ``len(bag)``."""
    sizes = getattr(dataset, "n_instances", None)
    if sizes is None:
        sizes = [len(dataset[i]) for i in range(len(dataset))]
    return np.asarray(sizes, dtype=np.int64)


def length_grouped_batches(order: Sequence[int], lengths: np.ndarray, batch_size: int,
                           generator: torch.Generator, pool: int = 8) -> list[np.ndarray]:
    """``order`` (shuffled dataset indices) cut into pools of ``pool * batch_size``, each pool sorted by
    ``lengths`` (stable) and cut into batches of ``batch_size``; the batches come back in an order drawn from
    ``generator``. Every index appears exactly once."""
    order = np.asarray(order, dtype=np.int64)
    if batch_size < 1 or pool < 1:
        raise ValueError(f"length_grouped_batches: batch_size and pool must be >= 1, got {batch_size}, {pool}")
    batches: list[np.ndarray] = []
    size = pool * batch_size
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(batches), generator=generator).numpy()
    return [batches[i] for i in permutation]


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    dataset: Dataset,
    split: str = "val",
    device: str | torch.device = "auto",
    batch_size: int = 1,
    amp: bool = False,
    with_attention: bool = True,
    num_workers: int = 0,
    group_by_length: bool = False,
) -> EvalResult:
    """Score ``model`` on every bag of ``dataset`` in eval mode.

    The loss is the task loss over the whole split at once (identical to the per-slide mean for cross-entropy and
    NLL; the Cox loss needs the whole risk set), auxiliary losses excluded. Returns metrics, a predictions DataFrame
    (``slide_id, split,`` target columns, prediction columns) and, if asked, attention ``{slide_id: [heads, N]}``.
    ``group_by_length``: batch the bags in length order (less padding); results still come in dataset order.
    """
    device = resolve_device(str(device)) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    logits_all, targets_all, ids_all = [], [], []
    attention: dict[str, np.ndarray] = {}
    grouped = group_by_length and batch_size > 1
    order = np.argsort(bag_lengths(dataset), kind="stable") if grouped else None
    for bags in _loader(dataset, order, batch_size, num_workers):
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
    logits, targets = torch.cat(logits_all), torch.cat(targets_all)
    if grouped:  # back to dataset order
        restore = np.argsort(order, kind="stable")
        logits, targets = logits[restore], targets[restore]
        ids_all = [ids_all[i] for i in restore]
        attention = {slide_id: attention[slide_id] for slide_id in ids_all if slide_id in attention}
    loss = float(task.loss(logits, targets)) if len(logits) else float("nan")
    predictions = task.predict(logits)
    metrics = task.metrics(predictions, targets)
    frame = pd.DataFrame({"slide_id": ids_all, "split": split, **task.target_columns(targets),
                          **task.prediction_columns(predictions)})
    return EvalResult(loss, metrics, frame, attention)


@torch.no_grad()
def attention_of(model: nn.Module, bags: Sequence[Any], device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Eval-mode attention ``{slide_id: [heads, N]}`` of ``bags`` (one at a time); models without attention give {}.
    ``device``: default the model's own."""
    device = next(model.parameters()).device if device is None else torch.device(device)
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


# ----------------------------------------------------------------------------------------------------- the step
class BagStep:
    """The two-stage training step over feature-bag datasets (``milstudy.train.loop.TrainingStep``)."""

    def __init__(self, model: nn.Module, task: Task, train_ds: Dataset, val_ds: Dataset | None,
                 test_ds: Dataset | None, config: TrainConfig) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"train_two_stage(model, task, train_ds, val_ds, test_ds, config): task is {type(task)}")
        self.config, self.device = config, resolve_device(config.device)
        self.datasets = {"train": train_ds, "val": val_ds, "test": test_ds}
        for dataset in self.datasets.values():  # NaN/inf or malformed bags stop the run now, not at test time
            if dataset is not None:
                validate_bags(dataset)
        train_ids, train_raw = bag_targets(train_ds)
        self.task = task.prepare(train_raw, train_ids)
        for dataset in (val_ds, test_ds):
            if dataset is not None:  # check labels now rather than after hours of training
                ids, raw = bag_targets(dataset)
                self.task.make_targets(raw, ids)
        if getattr(self.task, "needs_batches", False) and config.batch_size < 2:
            raise ValueError("the Cox loss compares slides within a batch: set TrainConfig.batch_size >= 2")
        self.indices = np.arange(len(train_ds))
        if config.oversample is not None:
            if not isinstance(self.task, ClassificationTask):
                raise ValueError("TrainConfig.oversample applies to classification/grading tasks only")
            self.indices = oversample_indices(self.task.make_targets(train_raw).numpy(), config.oversample, config.seed)
        self.lengths = bag_lengths(train_ds) if config.group_by_length and config.batch_size > 1 else None
        self.steps_per_epoch = math.ceil(len(self.indices) / config.batch_size)
        self.model = model.to(self.device)
        self.ema_decay = None
        self.snapshot_bags = _find_bags(config.snapshot_slides, (train_ds, val_ds, test_ds))

    def prepare(self, state: LoopState) -> None:
        pass

    def batches(self, state: LoopState):
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + state.epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=generator).numpy()]
        grouped = None
        if cfg.group_by_length and cfg.batch_size > 1:
            grouped = length_grouped_batches(order, self.lengths, cfg.batch_size, generator)
        for bags in _loader(self.datasets["train"], order, cfg.batch_size, cfg.num_workers, grouped):
            if cfg.instance_share is not None:
                bags = subsample_instances(bags, cfg.instance_share, cfg.seed, state.epoch)
            yield _to_batch(bags, self.device)

    def loss(self, batch: dict[str, Any], state: LoopState) -> StepLoss:
        targets = self.task.make_targets(batch["raw_targets"], batch["slide_ids"]).to(self.device)
        return task_loss(self.task, _forward(state.model, batch, targets), targets)

    def describe(self, batch: dict[str, Any]) -> str:
        return f"slides {batch['slide_ids'][:5]}"

    def end_epoch(self, state: LoopState) -> dict[str, Any]:
        return {"train_bags": len(self.indices)}

    def evaluate(self, split: str, model: nn.Module, with_attention: bool) -> EvalResult | None:
        dataset = self.datasets.get(split)
        if dataset is None:
            return None
        cfg = self.config
        return evaluate(model, self.task, dataset, split, self.device, cfg.eval_batch_size,
                        cfg.amp and self.device.type == "cuda", with_attention, cfg.num_workers, cfg.group_by_length)

    def snapshot(self, model: nn.Module) -> dict[str, np.ndarray]:
        return attention_of(model, self.snapshot_bags, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def train_two_stage(
    model: nn.Module,
    task: Task,
    train_ds: Dataset,
    val_ds: Dataset | None,
    test_ds: Dataset | None = None,
    config: TrainConfig | None = None,
) -> FitResult:
    """Train ``model`` on ``train_ds`` bags, select on ``val_ds``, score ``test_ds`` after training (module doc).

    Seed the RNGs (``seed_everything``) before building ``model`` for a reproducible initialisation; the model
    passed in holds the selected weights afterwards.
    """
    config = config or TrainConfig()
    seed_everything(config.seed)
    return fit(BagStep(model, task, train_ds, val_ds, test_ds, config), config)
