"""End-to-end MIL training: sampler -> patch encoder -> any zoo aggregator -> task loss, trained jointly on slide
labels (ABMILX paper, Tang, Qin et al., Eq. 1; specs/abmilx.md §2.1-2.3, §2.7).

``train_e2e(slides, task, config)`` builds an :class:`E2EStep` and runs the one loop (``milstudy.train.loop.fit``:
optimizer, cosine schedule with warmup, EMA, validation-only selection, early stopping, checkpoints, exact resume,
DDP stop decisions). Reading order of the step:

1. Slides come from ``milstudy.data.e2e_slides`` (``E2ESlide``: main- and low-scale patch banks or grids).
2. Each epoch a ``_TrainSlides`` dataset draws ``s`` instances per slide (``milstudy.data.instance_sampling``:
   MRIS, single-scale random, regional (composed with the MRIS low scale), or attention top-k), deterministically
   from ``(seed, draw, slide)`` with ``draw = epoch - 1``. Several slides form a batch; a slide with fewer patches
   than ``s`` follows the repeat rule (padding by random repetition, per scale, when ``batch_slides > 1``).
3. ``E2EStep.loss``: augmentation (flips + RandomResizedCrop(scale=(c, 1)), no colour; spec §2.3), all ``B * s``
   patches encoded in one batch (BN statistics from that batch), the aggregator with the patches' level-0
   coordinates, task loss + weighted extra streams + auxiliary losses (models with ``needs_targets`` get the
   labels). AMP and channels_last on CUDA.
4. ``evaluate_slides``: every main-scale patch of a slide, encoded in chunks of ``eval_chunk`` under no-grad
   (chunked = unchunked), then the aggregator once on the whole bag with its coordinates.
5. A slide that cannot be read is skipped, logged and counted; running out of memory raises an error naming the
   settings to lower (``batch_slides``, ``s``, ``eval_chunk``).

The command line is ``milstudy.train.e2e_cli`` (``python -m milstudy.train.e2e`` also runs it, under torchrun too).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from milstudy.data import instance_sampling as S
from milstudy.data.e2e_slides import E2ESlide, UnreadableSlideError
from milstudy.models.base import MILOutput, build_model
from milstudy.train import distributed as dist_utils
from milstudy.train.loop import (EpochState, EvalResult, FitResult, LoopConfig, LoopState, StepLoss, fit,
                                 resolve_device, seed_everything, task_loss)
from milstudy.train.tasks import Task

log = logging.getLogger("milstudy.e2e")

SAMPLERS = ("mris", "random", "regional", "attention")


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class E2EConfig(LoopConfig):
    """An end-to-end run: :class:`~milstudy.train.loop.LoopConfig` (optimisation, selection, checkpoints; defaults
    of specs/abmilx.md §5.5, profile S) plus

    encoder / encoder_weights / encoder_kwargs: ``milstudy.encoders.build_encoder`` arguments (weights = a local
        file). encoder_init: "random" (tiny_cnn and tests) | "pretrained" (paper settings: refused without
        ``encoder_weights``, so a paper run never trains a randomly initialised ResNet-18 by accident).
    aggregator / aggregator_kwargs: ``milstudy.models.build_model`` arguments (any zoo model).
    sampler: "mris" | "random" (single scale) | "regional" (main scale by regions + the MRIS low scale) |
        "attention" (EMA top-k; the expensive baseline).
    s: instances per slide per step; ratio: MRIS multi-scale ratio r (n_low = floor(s/r); inf = single scale);
        regions: g of the g x g regional grid.
    batch_slides: slides per optimisation step (per process under DDP).
    crop_size: encoder input size (None = the stored patch size). rrc_scale_min: c of RandomResizedCrop(scale=(c,1))
        (1.0 = no crop); hflip / vflip: random flips. No colour augmentation (spec §2.3).
    descriptor_noise: sd of the Gaussian noise added to descriptor "patches" in training (descriptor tier only).
    amp, channels_last: CUDA only. attention_ema_decay: the EMA that scores patches for attention sampling when
        ``ema_decay`` is None. eval_chunk: patches per encoder call at evaluation.
    num_workers: DataLoader workers. patch_cache: train from in-memory patch banks (True) or read from the slides
        through OpenSlide (False). sync_bn: SyncBatchNorm under DDP (CUDA).
    """

    encoder: str = "tiny_cnn"
    encoder_weights: str | None = None
    encoder_kwargs: dict = field(default_factory=dict)
    encoder_init: str = "random"
    aggregator: str = "abmilx"
    aggregator_kwargs: dict = field(default_factory=dict)
    sampler: str = "mris"
    s: int = 64
    ratio: float = 4.0
    regions: int = 2
    batch_slides: int = 2
    crop_size: int | None = None
    rrc_scale_min: float = 0.25
    hflip: bool = True
    vflip: bool = True
    descriptor_noise: float = 0.0
    amp: bool = True
    channels_last: bool = True
    attention_ema_decay: float = 0.99
    eval_chunk: int = 2048
    num_workers: int = 0
    patch_cache: bool = True
    sync_bn: bool = False
    quiet: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"E2EConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.encoder_init not in ("random", "pretrained"):
            raise ValueError(f"E2EConfig.encoder_init must be 'random' or 'pretrained', got {self.encoder_init!r}")
        if self.s < 1 or self.batch_slides < 1 or self.eval_chunk < 1:
            raise ValueError("E2EConfig: s, batch_slides and eval_chunk must be >= 1")
        if not 0.0 < self.rrc_scale_min <= 1.0:
            raise ValueError(f"E2EConfig.rrc_scale_min must be in (0, 1], got {self.rrc_scale_min}")
        self.ratio = float(self.ratio)  # "inf" from YAML
        if not self.ratio >= 1.0:
            raise ValueError(f"E2EConfig.ratio (MRIS r) must be >= 1 or inf, got {self.ratio}")


# -------------------------------------------------------------------------------------------------------- model
class E2EModel(nn.Module):
    """Encoder + aggregator: ``images [B, n, 3, H, W]`` float in [0, 1] -> ``MILOutput`` (logits ``[B, n_out]``).
    The training hooks (``after_optimizer_step``, ``on_epoch_end``) reach the aggregator."""

    def __init__(self, encoder: nn.Module, aggregator: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator

    def forward(self, images: torch.Tensor, coords: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> MILOutput:
        batch, n = images.shape[:2]
        features = self.encoder(images.flatten(0, 1)).view(batch, n, -1)
        kwargs = {"targets": targets} if targets is not None else {}
        return self.aggregator(features, coords=coords, **kwargs)

    def after_optimizer_step(self) -> None:
        hook = getattr(self.aggregator, "after_optimizer_step", None)
        if callable(hook):
            hook()

    def on_epoch_end(self, epoch: int) -> None:
        hook = getattr(self.aggregator, "on_epoch_end", None)
        if callable(hook):
            hook(epoch)


def build_e2e_model(config: E2EConfig, n_out: int) -> E2EModel:
    """Encoder (``build_encoder``) + aggregator (``build_model``), both seeded from ``config.seed``."""
    from milstudy.encoders import build_encoder

    if config.encoder_init == "pretrained" and not config.encoder_weights:
        raise ValueError(
            f"this setting starts from pretrained {config.encoder} weights but no file was given: pass a local "
            f"weights file (--set encoder_weights=/path/to/{config.encoder}.safetensors, or encoder_weights: in the "
            f"YAML), or --set encoder_init=random to train from a random initialisation on purpose")
    encoder = build_encoder(config.encoder, weights=config.encoder_weights, seed=config.seed, **config.encoder_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        aggregator = build_model(config.aggregator, encoder.out_dim, n_out, **config.aggregator_kwargs)
    return E2EModel(encoder, aggregator)


# ------------------------------------------------------------------------------------------------- augmentation
def to_float_images(patches: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., p, p, 3]`` -> float ``[..., 3, p, p]`` in [0, 1]."""
    return patches.movedim(-1, -3).float().div_(255.0)


def random_resized_crop_flip(
    images: torch.Tensor, out_size: int, scale_min: float, hflip: bool, vflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Batched geometric augmentation of ``images [K, 3, H, W]`` -> ``[K, 3, out_size, out_size]``.

    RandomResizedCrop with area fraction ~ U(scale_min, 1) and aspect ratio log-uniform in [3/4, 4/3] (torchvision's
    defaults; boxes that do not fit are clamped to the image instead of redrawn), resampled with
    ``torchvision.ops.roi_align`` (bilinear, area-averaged), then independent horizontal / vertical flips (p = 0.5).
    With ``scale_min = 1`` the box is the whole image (aspect-ratio jitter aside).
    """
    from torchvision.ops import roi_align

    k, _, height, width = images.shape
    cpu = dict(generator=generator)
    if scale_min < 1.0:
        area = torch.empty(k).uniform_(scale_min, 1.0, **cpu)
        log_ratio = torch.empty(k).uniform_(math.log(3 / 4), math.log(4 / 3), **cpu)
        ratio = log_ratio.exp()
        box_w = (area * ratio).sqrt().clamp(max=1.0) * width
        box_h = (area / ratio).sqrt().clamp(max=1.0) * height
        x0 = torch.rand(k, **cpu) * (width - box_w)
        y0 = torch.rand(k, **cpu) * (height - box_h)
        boxes = torch.stack([torch.arange(k, dtype=torch.float32), x0, y0, x0 + box_w, y0 + box_h], dim=1)
        images = roi_align(images, boxes.to(images), output_size=(out_size, out_size), aligned=True)
    elif out_size != height or out_size != width:
        images = F.interpolate(images, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    if hflip:
        flip = (torch.rand(k, **cpu) < 0.5).to(images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if vflip:
        flip = (torch.rand(k, **cpu) < 0.5).to(images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-2), images)
    return images


def is_descriptors(patches: torch.Tensor) -> bool:
    """Whether a slide's "patches" are descriptor vectors ``[n, d]`` (or ``[B, n, d]``, float) rather than uint8
    images ``[n, p, p, 3]``: the cheap synthetic tier (spec abmilx §4.1 / asmil §4.1 "S-vec") trains a descriptor
    encoder (an MLP) end to end on them, with no image augmentation."""
    return patches.dtype.is_floating_point and patches.ndim in (2, 3)


def resize_for_eval(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Test-time resize of ``[K, 3, H, W]`` to ``size`` (upstream stores test patches pre-resized to 224)."""
    if size is None or (images.shape[-1] == size and images.shape[-2] == size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------------------------------------------- datasets
class _TrainSlides(Dataset):
    """Item ``i`` -> dict(patches uint8 ``[n, p, p, 3]``, coords ``[n, 2]`` or None, index, error). Sampling is
    seeded by ``(seed, draw, i)``."""

    def __init__(self, slides: Sequence[E2ESlide], config: E2EConfig, draw: int, pad_to: int | None) -> None:
        self.slides, self.config, self.draw, self.pad_to = slides, config, draw, pad_to

    def __len__(self) -> int:
        return len(self.slides)

    def sample_indices(self, index: int) -> S.ScaleSample:
        slide, cfg = self.slides[index], self.config
        rng = np.random.default_rng([cfg.seed, self.draw, index])
        what = f"slide {slide.slide_id}"
        if cfg.sampler == "mris":
            return S.sample_multiscale(slide.n_main, slide.n_low, cfg.s, cfg.ratio, rng, self.pad_to, what)
        if cfg.sampler == "random":
            return S.ScaleSample(S.sample_random(slide.n_main, cfg.s, rng, self.pad_to, what), np.zeros(0, np.int64))
        if cfg.sampler == "regional":
            return S.sample_regional_multiscale(slide.coords, slide.n_low, cfg.s, cfg.ratio, cfg.regions, rng,
                                                self.pad_to, what)
        return S.ScaleSample(np.arange(slide.n_main), np.zeros(0, np.int64))  # attention: all, scored later

    def __getitem__(self, index: int) -> dict:
        slide = self.slides[index]
        try:
            picked = self.sample_indices(index)
            parts, coords = [], []
            if len(picked.low):  # low scale first, as upstream
                parts.append(slide.read("low", picked.low))
                coords.append(slide.coords_of("low", picked.low))
            parts.append(slide.read("main", picked.main))
            coords.append(slide.coords_of("main", picked.main))
            where = None if any(c is None for c in coords) else torch.from_numpy(np.concatenate(coords).astype(np.int64))
            return {"patches": torch.from_numpy(np.concatenate(parts)), "coords": where, "index": index, "error": None}
        except (UnreadableSlideError, ValueError) as error:
            return {"patches": None, "coords": None, "index": index, "error": str(error)}


def _collate(items: list[dict]) -> list[dict]:
    return items


# ------------------------------------------------------------------------------------------------- evaluation
def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _oom_message(config: E2EConfig, where: str) -> str:
    return (
        f"out of memory during {where}: lower batch_slides (now {config.batch_slides}) or s (now {config.s}) for "
        f"training, eval_chunk (now {config.eval_chunk}) for evaluation, or crop_size (now {config.crop_size}); "
        f"on CUDA keep amp=True (now {config.amp})"
    )


@torch.no_grad()
def encode_chunked(encoder: nn.Module, patches: np.ndarray | torch.Tensor, chunk: int, device: torch.device,
                   crop_size: int | None = None, amp: bool = False) -> torch.Tensor:
    """Encode uint8 ``[N, p, p, 3]`` patches (or float descriptors ``[N, d]``, see :func:`is_descriptors`) in chunks
    of ``chunk`` under no-grad -> float32 ``[N, D]`` on device."""
    out = []
    source = torch.as_tensor(patches)
    for start in range(0, len(source), chunk):
        block = source[start:start + chunk].to(device)
        images = block.float() if is_descriptors(block) else resize_for_eval(to_float_images(block), crop_size)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
            out.append(encoder(images).float())
    return torch.cat(out) if out else torch.zeros(0, getattr(encoder, "out_dim", 0), device=device)


@torch.no_grad()
def evaluate_slides(
    model: E2EModel,
    slides: Sequence[E2ESlide],
    task: Task,
    config: E2EConfig,
    device: torch.device,
    return_features: bool = False,
    with_metrics: bool = True,
    split: str = "",
    with_attention: bool = True,
) -> EvalResult:
    """Every main-scale patch of each slide, encoded in chunks of ``config.eval_chunk``, then the aggregator once
    with the slide's coordinates. Unreadable slides are skipped (listed in ``skipped``)."""
    model.eval()
    logits_list, targets_raw, ids, attention, features, skipped = [], [], [], {}, {}, []
    for slide in slides:
        try:
            patches = slide.read("main", np.arange(slide.n_main))
        except UnreadableSlideError as error:
            log.warning("evaluation: %s; skipped", error)
            skipped.append(slide.slide_id)
            continue
        try:
            feats = encode_chunked(model.encoder, patches, config.eval_chunk, device, config.crop_size, config.amp)
            coords = torch.as_tensor(slide.coords, dtype=torch.int64, device=device)[None]
            output = model.aggregator(feats[None], coords=coords)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if _is_oom(error):
                raise RuntimeError(_oom_message(config, f"evaluation of slide {slide.slide_id}")) from error
            raise
        logits_list.append(output.logits.float())
        targets_raw.append(slide.target)
        ids.append(slide.slide_id)
        if with_attention and output.attention is not None:
            attention[slide.slide_id] = output.attention[0].float().cpu().numpy()
        if return_features:
            features[slide.slide_id] = feats.cpu().numpy()
    if not ids:
        return EvalResult(float("nan"), {}, pd.DataFrame(), attention, features, skipped)
    logits = torch.cat(logits_list)
    targets = task.make_targets(targets_raw, ids)
    loss = float(task.loss(logits, targets.to(device)))
    predictions = task.predict(logits)
    frame = pd.DataFrame({"slide_id": ids, "split": split, **task.target_columns(targets),
                          **task.prediction_columns(predictions)})
    metrics = task.metrics(predictions, targets) if with_metrics else {}
    return EvalResult(loss, metrics, frame, attention, features, skipped)


def _select_attention_topk(scorer: E2EModel, patches: torch.Tensor, coords: torch.Tensor | None, config: E2EConfig,
                           device: torch.device, pad_to: int | None, rng: np.random.Generator):
    """Attention sampling: score all patches with the EMA ``scorer`` under no-grad (with their coordinates), keep
    the top-s by head vote. Returns the kept patches and their coordinates."""
    feats = encode_chunked(scorer.encoder, patches, config.eval_chunk, device, config.crop_size, config.amp)
    with torch.no_grad():
        output = scorer.aggregator(feats[None], coords=None if coords is None else coords[None].to(device))
    if output.attention is None:
        raise ValueError(f"attention sampling needs an aggregator with attention; {config.aggregator!r} has none")
    picked = S.topk_by_head_vote(output.attention[0].float().cpu().numpy(), config.s)
    if pad_to:
        picked = S.pad_by_repetition(picked, pad_to, rng)
    picked = torch.as_tensor(picked)
    return patches[picked], None if coords is None else coords[picked]


# ---------------------------------------------------------------------------------------------------- the step
class E2EStep:
    """The end-to-end training step (``milstudy.train.loop.TrainingStep``): sampled patches of ``batch_slides``
    slides per step through encoder + aggregator."""

    def __init__(self, model: E2EModel, task: Task, slides: Mapping[str, Sequence[E2ESlide]], config: E2EConfig,
                 device: torch.device) -> None:
        self.model, self.task, self.config, self.device = model, task, config, device
        self.dist = dist_utils.current()
        self.train = list(slides["train"])
        self.splits = {"val": list(slides.get("val", []) or []), "test": list(slides.get("test", []) or [])}
        self.ema_decay = config.ema_decay or (config.attention_ema_decay if config.sampler == "attention" else None)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train) / self.dist.world_size) / config.batch_slides)
        self.pad_to = config.s if config.batch_slides > 1 else None
        wanted = set(config.snapshot_slides)
        self.snapshot_pool = [s for s in self.train + self.splits["val"] + self.splits["test"] if s.slide_id in wanted]
        self.skipped: list[str] = []
        self.train_model: nn.Module = model
        self._seen = 0

    def prepare(self, state: LoopState) -> None:
        if self.dist.enabled:
            self.train_model = dist_utils.wrap_ddp(  # label-driven branches (CLAM) may go unused in a step
                self.model, self.device, find_unused_parameters=getattr(self.model.aggregator, "needs_targets", False))

    def batches(self, state: LoopState):
        cfg, draw = self.config, state.epoch - 1  # draws keep the 0-based index of the pre-loop trainer
        dataset = _TrainSlides(self.train, cfg, draw, self.pad_to if cfg.sampler != "attention" else None)
        sampler = dist_utils.epoch_sampler(len(dataset), self.dist, cfg.seed, draw)
        loader = DataLoader(dataset, batch_size=cfg.batch_slides, sampler=sampler, collate_fn=_collate,
                            num_workers=cfg.num_workers, persistent_workers=False)
        aug_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + draw * 1_009 + self.dist.rank)
        self._seen = 0
        for items in loader:
            good = []
            for item in items:
                if item["error"] is not None:
                    slide_id = self.train[item["index"]].slide_id
                    log.warning("epoch %d: slide %s skipped: %s", state.epoch, slide_id, item["error"])
                    self.skipped.append(slide_id)
                else:
                    good.append(item)
            if self.dist.enabled:  # every rank must step together: a rank without slides would hang the all-reduce
                good = dist_utils.agree_nonempty(good)
            if not good:
                continue
            patches, coords = [item["patches"] for item in good], [item["coords"] for item in good]
            if cfg.sampler == "attention":
                rng = np.random.default_rng([cfg.seed, draw, state.step])
                picked = [_select_attention_topk(state.ema.module, p, c, cfg, self.device, self.pad_to, rng)
                          for p, c in zip(patches, coords)]
                patches, coords = [p for p, _ in picked], [c for _, c in picked]
            n_min = min(len(p) for p in patches)  # only differs with batch_slides > 1 and no padding
            patches = [p[:n_min] for p in patches]
            stacked = torch.stack(patches).to(self.device, non_blocking=True)  # [B, n, p, p, 3] or [B, n, d]
            b, n = stacked.shape[:2]
            if is_descriptors(stacked):
                images = stacked.float()
                if cfg.descriptor_noise > 0:  # the descriptor tier's augmentation: additive Gaussian noise
                    images = images + cfg.descriptor_noise * torch.randn(images.shape, generator=aug_gen).to(images)
            else:
                crop = cfg.crop_size or self.train[0].patch_size
                images = random_resized_crop_flip(to_float_images(stacked.flatten(0, 1)), crop, cfg.rrc_scale_min,
                                                  cfg.hflip, cfg.vflip, aug_gen).view(b, n, 3, crop, crop)
            where = None if any(c is None for c in coords) else torch.stack([c[:n_min] for c in coords]).to(self.device)
            slides = [self.train[item["index"]] for item in good]
            targets = self.task.make_targets([s.target for s in slides], [s.slide_id for s in slides]).to(self.device)
            self._seen += b
            yield {"images": images, "coords": where, "targets": targets, "slide_ids": [s.slide_id for s in slides]}

    def loss(self, batch: dict[str, Any], state: LoopState) -> StepLoss:
        targets = batch["targets"]
        needs = getattr(self.model.aggregator, "needs_targets", False) and targets.ndim == 1 \
            and not targets.dtype.is_floating_point
        if getattr(self.model.aggregator, "needs_coords", False) and batch["coords"] is None:
            raise ValueError(f"slides {batch['slide_ids'][:5]}: {type(self.model.aggregator).__name__} is "
                             "position-aware, but the sampled patches have no coordinates (the low-scale patches of "
                             "these slides carry none): give the slides low_coords or a low_grid, or train single-"
                             "scale (ratio=inf)")
        output = self.train_model(batch["images"], coords=batch["coords"], targets=targets if needs else None)
        return task_loss(self.task, output, targets)

    def describe(self, batch: dict[str, Any]) -> str:
        return f"slides {batch['slide_ids'][:5]}"

    def oom_message(self, where: str) -> str:
        return _oom_message(self.config, where)

    def end_epoch(self, state: LoopState) -> dict[str, Any]:
        if self.dist.enabled:
            dist_utils.sync_buffers(self.model)
        return {"slides": self._seen}

    def evaluate(self, split: str, model: nn.Module, with_attention: bool) -> EvalResult | None:
        slides = self.splits.get(split)
        if not slides:
            return None
        return evaluate_slides(model, slides, self.task, self.config, self.device, split=split,
                               with_attention=with_attention)

    def snapshot(self, model: nn.Module) -> dict[str, np.ndarray]:
        if not self.snapshot_pool:
            return {}
        return evaluate_slides(model, self.snapshot_pool, self.task, self.config, self.device,
                               with_metrics=False).attention

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = list(state.get("skipped", []))


def train_e2e(
    slides: Mapping[str, Sequence[E2ESlide]],
    task: Task,
    config: E2EConfig,
    callbacks: Sequence[Callable[[EpochState], None]] = (),
    keep_model: bool = False,
) -> FitResult:
    """Train encoder + aggregator jointly on ``slides["train"]``, select on ``slides["val"]``, test on ``slides["test"]``.

    ``slides``: split name -> list of ``E2ESlide`` ("train" required; "val" and "test" optional; without "val" the
    last epoch is used). ``task``: a ``milstudy.train.tasks`` task (fitted here on the training targets).
    ``callbacks``: called after every epoch with an ``EpochState`` (e.g. sparsity / risk logging).
    Under ``torchrun`` (``WORLD_SIZE > 1``) training runs with DDP; see ``milstudy.train.distributed``.
    """
    dist = dist_utils.current()
    device = dist.device if dist.enabled else resolve_device(config.device)
    seed_everything(config.seed)
    train_slides = list(slides["train"])
    if not train_slides:
        raise ValueError("train_e2e: the training split has no slides")
    task = task.prepare([s.target for s in train_slides], [s.slide_id for s in train_slides])
    model = build_e2e_model(config, task.n_out).to(device)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and config.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return fit(E2EStep(model, task, slides, config, device), config, callbacks, keep_model)


if __name__ == "__main__":  # ``python -m milstudy.train.e2e`` (and under torchrun) runs the command line
    from milstudy.train.e2e_cli import main

    raise SystemExit(main())
