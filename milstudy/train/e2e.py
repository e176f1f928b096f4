"""End-to-end MIL training: sampler -> patch encoder -> any zoo aggregator -> task loss, trained jointly on slide
labels (ABMILX paper, Tang, Qin et al., Eq. 1; specs/abmilx.md §2.1-2.3, §2.7).

Reading order:

1. ``E2ESlide`` holds one slide: its main- and low-scale patch grids and, on CPU (``patch_cache=True``), the
   uint8 patch banks ``[N, p, p, 3]`` from ``milstudy.data.patches.extract_patch_bank``; without banks patches are
   read through OpenSlide (``PatchDataset``) inside DataLoader workers. ``slides_from_manifest`` builds them.
2. Each epoch a ``_TrainSlides`` dataset draws ``s`` instances per slide (``milstudy.data.sampling``: MRIS,
   single-scale random, regional, or attention top-k), deterministically from ``(seed, epoch, slide)``. Several
   slides form a batch; a slide with fewer patches than ``s`` follows the repeat rule (padding by random repetition
   when ``batch_slides > 1``).
3. ``train_step``: augmentation (flips + RandomResizedCrop(scale=(c, 1)), no colour; spec §2.3), all ``B * s``
   patches encoded in one batch (BN statistics from that batch), the aggregator per slide, task loss + auxiliary
   losses, optimiser step (Adam/AdamW, cosine with warmup, from ``milstudy.train.trainer``), EMA update. AMP and
   channels_last on CUDA.
4. ``evaluate_slides``: every main-scale patch of a slide, encoded in chunks of ``eval_chunk`` under no-grad
   (chunked = unchunked), then the aggregator once on the whole bag; predictions, attention ``[heads, N]`` and
   optionally instance features.
5. Model selection and early stopping on the validation split only; the test split is evaluated once at the end.
   A slide that cannot be read is skipped, logged and counted; running out of memory raises an error naming the
   settings to lower (``batch_slides``, ``s``, ``eval_chunk``).

``python -m milstudy.train.e2e --config C.yaml`` (also under ``torchrun``) runs one configuration; see ``main``.
``run_grid`` runs named configurations over seeds for the study notebooks.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from milstudy.data import sampling as S
from milstudy.models.base import MILOutput, build_model
from milstudy.train.tasks import Task
from milstudy.train import checkpoint as ckpt
from milstudy.train.trainer import EMA, FitResult, build_optimizer, cosine_schedule, seed_everything, set_lr
from milstudy.train.trainer import _better as _improved  # same selection rule as the two-stage trainer

log = logging.getLogger("milstudy.e2e")

SAMPLERS = ("mris", "random", "regional", "attention")


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class E2EConfig:
    """Everything an end-to-end run depends on (defaults: specs/abmilx.md §5.5, profile S).

    encoder / encoder_weights / encoder_kwargs: ``milstudy.encoders.build_encoder`` arguments (weights = local file).
    aggregator / aggregator_kwargs: ``milstudy.models.build_model`` arguments (any zoo model).
    sampler: "mris" | "random" (single scale) | "regional" | "attention" (EMA top-k; the expensive baseline).
    s: instances per slide per step; ratio: MRIS multi-scale ratio r (n_low = floor(s/r); inf = single scale);
        regions: g of the g x g regional grid.
    epochs, lr, weight_decay, optimizer ("adamw" | "adam"), betas, warmup_epochs, min_lr_ratio: optimisation
        (cosine schedule per step with linear warmup). grad_clip: max gradient norm or None.
    batch_slides: slides per optimisation step (per process under DDP).
    crop_size: encoder input size (None = the stored patch size). rrc_scale_min: c of RandomResizedCrop(scale=(c,1))
        (1.0 = no crop); hflip / vflip: random flips. No colour augmentation (spec §2.3).
    amp, channels_last: CUDA only. ema_decay: whole-model EMA (None = off; attention sampling always keeps one, at
        ``attention_ema_decay`` if ``ema_decay`` is None). eval_chunk: patches per encoder call at evaluation.
    monitor: validation metric for selection ("auto" = the task's primary metric, "loss", or a metric name);
        patience / min_epochs: early stopping. seed: everything (init, sampling order, augmentation).
    device: "auto" | "cpu" | "cuda" | "cuda:1". num_workers: DataLoader workers. patch_cache: train from in-memory
        patch banks (True) or read from the slides through OpenSlide (False).
    snapshot_slides: slide ids whose attention is recorded every epoch; sync_bn: SyncBatchNorm under DDP (CUDA).
    checkpoint_dir: where rank 0 writes a checkpoint after every epoch (weights, optimizer, EMA, RNG, history; see
        ``milstudy.train.checkpoint``) and the best-validation weights; resume: continue from the latest one there
        (same config required; the result equals an uninterrupted run). None = no checkpoints.
    """

    encoder: str = "tiny_cnn"
    encoder_weights: str | None = None
    encoder_kwargs: dict = field(default_factory=dict)
    aggregator: str = "abmilx"
    aggregator_kwargs: dict = field(default_factory=dict)
    sampler: str = "mris"
    s: int = 64
    ratio: float = 4.0
    regions: int = 2
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    batch_slides: int = 2
    crop_size: int | None = None
    rrc_scale_min: float = 0.25
    hflip: bool = True
    vflip: bool = True
    amp: bool = True
    channels_last: bool = True
    ema_decay: float | None = None
    attention_ema_decay: float = 0.99
    eval_chunk: int = 2048
    monitor: str = "auto"
    patience: int | None = None
    min_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    patch_cache: bool = True
    snapshot_slides: Sequence[str] = ()
    sync_bn: bool = False
    quiet: bool = True
    checkpoint_dir: str | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"E2EConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.s < 1 or self.batch_slides < 1 or self.epochs < 1 or self.eval_chunk < 1:
            raise ValueError("E2EConfig: s, batch_slides, epochs and eval_chunk must be >= 1")
        if not 0.0 < self.rrc_scale_min <= 1.0:
            raise ValueError(f"E2EConfig.rrc_scale_min must be in (0, 1], got {self.rrc_scale_min}")
        self.ratio = float(self.ratio)
        if not self.ratio >= 1.0:
            raise ValueError(f"E2EConfig.ratio (MRIS r) must be >= 1 or inf, got {self.ratio}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["snapshot_slides"] = list(self.snapshot_slides)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "E2EConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown E2EConfig field(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("ratio"), str):
            values["ratio"] = float(values["ratio"])  # "inf" from YAML
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


# ------------------------------------------------------------------------------------------------------ slides
class UnreadableSlideError(RuntimeError):
    """A slide whose patches cannot be read (file gone, corrupt); the trainer skips and counts it."""


@dataclass
class E2ESlide:
    """One slide for end-to-end training.

    main / low: uint8 patch banks ``[N, p, p, 3]`` / ``[M, p, p, 3]`` (None: read from ``path`` through OpenSlide
    with ``main_grid`` / ``low_grid``). coords: int ``[N, 2]`` level-0 main-scale coordinates.
    target: the raw target (label, or ``(time, event)`` for survival). instance_labels: optional int ``[N]``.
    """

    slide_id: str
    target: Any
    coords: np.ndarray
    main: np.ndarray | None = None
    low: np.ndarray | None = None
    path: str | None = None
    main_grid: Any = None
    low_grid: Any = None
    instance_labels: np.ndarray | None = None

    @property
    def n_main(self) -> int:
        return len(self.coords)

    @property
    def patch_size(self) -> int:
        """Side in px of the stored main-scale patches."""
        if self.main is not None:
            return int(self.main.shape[1])
        if self.main_grid is not None:
            return int(self.main_grid.patch_size)
        return int(self.read("main", np.arange(1)).shape[1])

    @property
    def n_low(self) -> int:
        if self.low is not None:
            return len(self.low)
        return len(self.low_grid) if self.low_grid is not None else 0

    def read(self, scale: str, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), p, p, 3]`` patches of ``scale`` ("main" | "low"); UnreadableSlideError on failure."""
        bank = self.main if scale == "main" else self.low
        if bank is not None:
            return bank[indices]
        grid = self.main_grid if scale == "main" else self.low_grid
        if grid is None or self.path is None:
            raise UnreadableSlideError(f"slide {self.slide_id}: no {scale}-scale patch bank and no slide path/grid")
        from milstudy.data.patches import read_patch
        from milstudy.data.slides import open_slide

        try:
            slide = open_slide(self.path, mpp=grid.slide_mpp or None)
            try:
                return np.stack([read_patch(slide, grid, int(i)) for i in indices])
            finally:
                slide.close()
        except Exception as error:  # noqa: BLE001 - any read failure makes the slide unusable for this step
            raise UnreadableSlideError(f"slide {self.slide_id} ({self.path}): {type(error).__name__}: {error}") from error


@dataclass
class E2ECase(E2ESlide):
    """A multi-slide case as one bag (specs/abmilx.md §2.6: "a multi-WSI case is one bag: the union of its slides'
    patches"). Main- and low-scale indices run over ``parts`` in order; ``slide_id`` is the case id and ``coords`` /
    ``instance_labels`` are the parts' concatenated (coordinates stay per-slide level-0 pixels)."""

    parts: list[E2ESlide] = field(default_factory=list)

    @property
    def n_main(self) -> int:
        return sum(part.n_main for part in self.parts)

    @property
    def n_low(self) -> int:
        return sum(part.n_low for part in self.parts)

    def read(self, scale: str, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return self.parts[0].read(scale, indices)
        sizes = [part.n_main if scale == "main" else part.n_low for part in self.parts]
        starts = np.cumsum([0] + sizes)
        owner = np.searchsorted(starts, indices, side="right") - 1
        out = None
        for k in np.unique(owner):
            at = np.flatnonzero(owner == k)
            patches = self.parts[k].read(scale, indices[at] - starts[k])
            if out is None:
                out = np.empty((len(indices),) + patches.shape[1:], patches.dtype)
            out[at] = patches
        return out


def cases_from_slides(slides: Sequence[E2ESlide], case_of: Mapping[str, str]) -> list[E2ESlide]:
    """One bag per case (``case_of[slide_id]``), in order of first appearance: a single-slide case is that slide
    renamed to the case id, several slides become an :class:`E2ECase`. Slides of one case must share the target."""
    groups: dict[str, list[E2ESlide]] = {}
    for slide in slides:
        groups.setdefault(str(case_of.get(slide.slide_id, slide.slide_id)), []).append(slide)
    out: list[E2ESlide] = []
    for case_id, members in groups.items():
        targets = {repr(m.target) for m in members}
        if len(targets) > 1:
            raise ValueError(f"case {case_id!r}: its slides {[m.slide_id for m in members]} have different targets "
                             f"{sorted(targets)}; a case-level bag needs one target")
        if len(members) == 1:
            out.append(replace(members[0], slide_id=case_id))
            continue
        labels = [m.instance_labels for m in members]
        out.append(E2ECase(case_id, members[0].target, np.concatenate([m.coords for m in members]),
                           main_grid=members[0].main_grid, low_grid=members[0].low_grid,
                           instance_labels=None if any(v is None for v in labels) else np.concatenate(labels),
                           parts=list(members)))
    return out


def slides_from_manifest(
    manifest: pd.DataFrame,
    target_column: str | Sequence[str] = "label",
    main_mpp: float = 2.0,
    patch_size: int = 32,
    low_factor: int = 2,
    load_banks: bool = True,
    min_tissue: float = 0.5,
    progress: bool = True,
) -> list[E2ESlide]:
    """Tile every manifest row at two scales (``cached_multiscale_grid``: tiled once per slide file and parameters,
    then read from ``cache_root()/grids/``) and, with ``load_banks``, load the (cached) patch banks.

    ``target_column``: a column name, or ``("survival_months", "event")`` for survival targets. Slides that fail to
    open or tile are skipped with a warning (the returned list says which were kept).
    """
    from tqdm.auto import tqdm

    from milstudy.data.patches import extract_patch_bank
    from milstudy.data.tiling import cached_multiscale_grid

    out: list[E2ESlide] = []
    rows = list(manifest.itertuples(index=False))
    for row in tqdm(rows, desc="tiling + patch banks", disable=not progress):
        row_d = row._asdict()
        if isinstance(target_column, str):
            target = row_d[target_column]
        else:
            target = tuple(row_d[c] for c in target_column)
        try:
            grids = cached_multiscale_grid(row_d["path"], main_mpp, patch_size, low_factor, min_tissue,
                                           slide_id=row_d["slide_id"])
            if grids.main.is_empty:
                log.warning("slide %s: no tissue patches at %.2f um/px; skipped", row_d["slide_id"], main_mpp)
                continue
            main = extract_patch_bank(row_d["path"], grids.main) if load_banks else None
            low = extract_patch_bank(row_d["path"], grids.low) if load_banks and not grids.low.is_empty else None
        except Exception as error:  # noqa: BLE001
            log.warning("slide %s (%s) skipped: %s", row_d["slide_id"], row_d["path"], error)
            continue
        out.append(E2ESlide(row_d["slide_id"], target, grids.main.coords, main, low, str(row_d["path"]),
                            grids.main, grids.low if not grids.low.is_empty else None))
    return out


# -------------------------------------------------------------------------------------------------------- model
class E2EModel(nn.Module):
    """Encoder + aggregator: ``images [B, n, 3, H, W]`` float in [0, 1] -> ``MILOutput`` (logits ``[B, n_out]``)."""

    def __init__(self, encoder: nn.Module, aggregator: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator

    def forward(self, images: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        batch, n = images.shape[:2]
        features = self.encoder(images.flatten(0, 1)).view(batch, n, -1)
        return self.aggregator(features, coords=coords)


def build_e2e_model(config: E2EConfig, n_out: int) -> E2EModel:
    """Encoder (``build_encoder``) + aggregator (``build_model``), both seeded from ``config.seed``."""
    from milstudy.encoders import build_encoder

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


def resize_for_eval(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Test-time resize of ``[K, 3, H, W]`` to ``size`` (upstream stores test patches pre-resized to 224)."""
    if size is None or (images.shape[-1] == size and images.shape[-2] == size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------------------------------------------- datasets
class _TrainSlides(Dataset):
    """Item ``i`` -> dict(patches uint8 ``[n, p, p, 3]``, index, error). Sampling is seeded by (seed, epoch, i)."""

    def __init__(self, slides: Sequence[E2ESlide], config: E2EConfig, epoch: int, pad_to: int | None) -> None:
        self.slides, self.config, self.epoch, self.pad_to = slides, config, epoch, pad_to

    def __len__(self) -> int:
        return len(self.slides)

    def sample_indices(self, index: int) -> S.ScaleSample:
        slide, cfg = self.slides[index], self.config
        rng = np.random.default_rng([cfg.seed, self.epoch, index])
        what = f"slide {slide.slide_id}"
        if cfg.sampler == "mris":
            return S.sample_multiscale(slide.n_main, slide.n_low, cfg.s, cfg.ratio, rng, self.pad_to, what)
        if cfg.sampler == "random":
            return S.ScaleSample(S.sample_random(slide.n_main, cfg.s, rng, self.pad_to, what), np.zeros(0, np.int64))
        if cfg.sampler == "regional":
            main = S.sample_regional(slide.coords, cfg.s, cfg.regions, rng, self.pad_to, what)
            return S.ScaleSample(main, np.zeros(0, np.int64))
        return S.ScaleSample(np.arange(slide.n_main), np.zeros(0, np.int64))  # attention: all, scored later

    def __getitem__(self, index: int) -> dict:
        slide = self.slides[index]
        try:
            picked = self.sample_indices(index)
            parts = []
            if len(picked.low):
                parts.append(slide.read("low", picked.low))  # low scale first, as upstream
            parts.append(slide.read("main", picked.main))
            return {"patches": torch.from_numpy(np.concatenate(parts)), "index": index, "error": None}
        except (UnreadableSlideError, ValueError) as error:
            return {"patches": None, "index": index, "error": str(error)}


def _collate(items: list[dict]) -> list[dict]:
    return items


# ----------------------------------------------------------------------------------------------------- results
@dataclass
class E2EResult(FitResult):
    """An end-to-end run: :class:`FitResult` plus training time and the slides that could not be read."""

    train_time: float = 0.0
    n_skipped: int = 0
    skipped_slides: list[str] = field(default_factory=list)
    model: nn.Module | None = None


@dataclass
class EpochState:
    """What per-epoch callbacks receive (``model`` is unwrapped, in eval mode, on the training device)."""

    epoch: int
    model: E2EModel
    row: dict[str, Any]
    snapshot: dict[str, np.ndarray]
    config: E2EConfig


# ----------------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _oom_message(config: E2EConfig, where: str) -> str:
    return (
        f"out of memory during {where}: lower batch_slides (now {config.batch_slides}) or s (now {config.s}) for "
        f"training, eval_chunk (now {config.eval_chunk}) for evaluation, or crop_size (now {config.crop_size}); "
        f"on CUDA keep amp=True (now {config.amp})"
    )


def _unwrap(model: nn.Module) -> E2EModel:
    return model.module if hasattr(model, "module") and isinstance(model.module, E2EModel) else model


@torch.no_grad()
def encode_chunked(encoder: nn.Module, patches: np.ndarray | torch.Tensor, chunk: int, device: torch.device,
                   crop_size: int | None = None, amp: bool = False) -> torch.Tensor:
    """Encode uint8 ``[N, p, p, 3]`` patches in chunks of ``chunk`` under no-grad -> float32 ``[N, D]`` on device."""
    out = []
    source = torch.as_tensor(patches)
    for start in range(0, len(source), chunk):
        images = resize_for_eval(to_float_images(source[start:start + chunk].to(device)), crop_size)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
            out.append(encoder(images).float())
    return torch.cat(out) if out else torch.zeros(0, getattr(encoder, "out_dim", 0), device=device)


@dataclass
class SlideOutputs:
    """Evaluation of a set of slides: per-slide predictions, attention ``{id: [heads, N]}``, features ``{id: [N, D]}``."""

    loss: float
    metrics: dict[str, float]
    predictions: pd.DataFrame
    attention: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    skipped: list[str]


@torch.no_grad()
def evaluate_slides(
    model: E2EModel,
    slides: Sequence[E2ESlide],
    task: Task,
    config: E2EConfig,
    device: torch.device,
    return_features: bool = False,
    with_metrics: bool = True,
) -> SlideOutputs:
    """Every main-scale patch of each slide, encoded in chunks of ``config.eval_chunk``, then the aggregator once.

    Unreadable slides are skipped (listed in ``skipped``). Returns metrics from ``task.metrics``.
    """
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
            coords = torch.as_tensor(slide.coords, dtype=torch.float32, device=device)[None]
            output = model.aggregator(feats[None], coords=coords)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if _is_oom(error):
                raise RuntimeError(_oom_message(config, f"evaluation of slide {slide.slide_id}")) from error
            raise
        logits_list.append(output.logits.float())
        targets_raw.append(slide.target)
        ids.append(slide.slide_id)
        if output.attention is not None:
            attention[slide.slide_id] = output.attention[0].float().cpu().numpy()
        if return_features:
            features[slide.slide_id] = feats.cpu().numpy()
    if not ids:
        return SlideOutputs(float("nan"), {}, pd.DataFrame(), attention, features, skipped)
    logits = torch.cat(logits_list)
    targets = task.make_targets(targets_raw, ids)
    loss = float(task.loss(logits, targets.to(device)))
    predictions = task.predict(logits)
    frame = pd.DataFrame({"slide_id": ids, **task.target_columns(targets), **task.prediction_columns(predictions)})
    metrics = task.metrics(predictions, targets) if with_metrics else {}
    return SlideOutputs(loss, metrics, frame, attention, features, skipped)


def _select_attention_topk(model: E2EModel, scorer: E2EModel, patches: torch.Tensor, config: E2EConfig,
                           device: torch.device, pad_to: int | None, rng: np.random.Generator) -> torch.Tensor:
    """Attention sampling: score all patches with the EMA ``scorer`` under no-grad, keep the top-s by head vote."""
    feats = encode_chunked(scorer.encoder, patches, config.eval_chunk, device, config.crop_size, config.amp)
    with torch.no_grad():
        output = scorer.aggregator(feats[None])
    if output.attention is None:
        raise ValueError(f"attention sampling needs an aggregator with attention; {config.aggregator!r} has none")
    picked = S.topk_by_head_vote(output.attention[0].float().cpu().numpy(), config.s)
    if pad_to:
        picked = S.pad_by_repetition(picked, pad_to, rng)
    return patches[torch.as_tensor(picked)]


# ------------------------------------------------------------------------------------------------------- train
# Fields that only change how a run executes, not what it computes: they may differ on resume.
_RUNTIME_FIELDS = ("device", "num_workers", "quiet", "checkpoint_dir", "resume", "eval_chunk")


def _resume(checkpoint_dir: Path | None, config: E2EConfig, model: nn.Module, ema: EMA | None,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
    """Load the latest complete checkpoint of ``checkpoint_dir`` into the model, EMA, optimizer, scaler and RNGs.

    Returns ``(state, snapshots, best_state)`` or None when there is nothing to resume. A checkpoint written with
    a different config (other than ``_RUNTIME_FIELDS``) is refused with the differing fields named.
    """
    latest = ckpt.latest_checkpoint(checkpoint_dir)
    if latest is None:
        return None
    state, optimizer_state, extra = ckpt.load_training_checkpoint(latest, model, ema.module if ema else None)
    saved = state.get("config", {})
    current = json.loads(json.dumps(config.to_dict(), default=str))  # tuples -> lists, as stored
    differ = sorted(k for k in current if k not in _RUNTIME_FIELDS and saved.get(k) != current[k])
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differ[:6])
        raise ValueError(f"{latest}: the checkpoint was written with another config ({detail}); "
                         f"use a new checkpoint_dir, or resume=False to start over")
    ckpt.restore_optimizer(optimizer_state, optimizer, scaler)
    best_state = ckpt.load_best_state(checkpoint_dir, model)
    log.info("resuming from %s (epoch %d done)", latest, state["epoch"])
    return state, ckpt.snapshots_from_tensors(extra.get("snapshots", {})), best_state


def train_e2e(
    slides: Mapping[str, Sequence[E2ESlide]],
    task: Task,
    config: E2EConfig,
    callbacks: Sequence[Callable[[EpochState], None]] = (),
    keep_model: bool = False,
) -> E2EResult:
    """Train encoder + aggregator jointly on ``slides["train"]``, select on ``slides["val"]``, test on ``slides["test"]``.

    ``slides``: split name -> list of ``E2ESlide`` ("train" required; "val" and "test" optional; without "val" the
    last epoch is used). ``task``: a ``milstudy.train.tasks`` task (fitted here on the training targets).
    ``callbacks``: called after every epoch with an ``EpochState`` (e.g. sparsity / risk logging).
    Under ``torchrun`` (``WORLD_SIZE > 1``) training runs with DDP; see ``milstudy.train.distributed``.
    """
    from milstudy.train import distributed as dist_utils

    start_wall = time.perf_counter()
    dist = dist_utils.current()
    device = dist.device if dist.enabled else resolve_device(config.device)
    seed_everything(config.seed)
    train_slides = list(slides["train"])
    val_slides, test_slides = list(slides.get("val", []) or []), list(slides.get("test", []) or [])
    if not train_slides:
        raise ValueError("train_e2e: the training split has no slides")
    task = task.prepare([s.target for s in train_slides], [s.slide_id for s in train_slides])
    model = build_e2e_model(config, task.n_out).to(device)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and config.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema_decay = config.ema_decay or (config.attention_ema_decay if config.sampler == "attention" else None)
    ema = EMA(model, ema_decay) if ema_decay else None
    optimizer = build_optimizer(model.parameters(), config)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    progress = _resume(checkpoint_dir, config, model, ema, optimizer, scaler) if config.resume else None
    train_model: nn.Module = dist_utils.wrap_ddp(model, device) if dist.enabled else model
    steps_per_epoch = math.ceil(math.ceil(len(train_slides) / dist.world_size) / config.batch_slides)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    pad_to = config.s if config.batch_slides > 1 else None
    patch_size = train_slides[0].patch_size
    crop = config.crop_size or patch_size
    monitor = task.primary_metric if config.monitor == "auto" else config.monitor
    mode = "min" if "loss" in monitor else "max"
    snapshot_ids = set(config.snapshot_slides)
    snapshot_pool = [s for s in train_slides + val_slides + test_slides if s.slide_id in snapshot_ids]

    history: list[dict[str, Any]] = []
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    best_state, best_epoch, best_value, best_loss, stale = None, -1, None, None, 0
    skipped: list[str] = []
    train_time = 0.0
    step, start_epoch, stop = 0, 0, False
    if progress is not None:
        state, snapshots, best_state = progress
        history, skipped, train_time, step = state["history"], state["skipped"], state["train_time"], state["step"]
        best_epoch, best_value, best_loss, stale = (state["best"][k] for k in ("epoch", "value", "loss", "stale"))
        start_epoch, stop = state["epoch"] + 1, state["stopped"]
        best_state = best_state if best_epoch >= 0 and val_slides else None
    for epoch in range(start_epoch, config.epochs if not stop else start_epoch):
        epoch_start = time.perf_counter()
        dataset = _TrainSlides(train_slides, config, epoch, pad_to if config.sampler != "attention" else None)
        sampler = dist_utils.epoch_sampler(len(dataset), dist, config.seed, epoch)
        loader = DataLoader(dataset, batch_size=config.batch_slides, sampler=sampler, collate_fn=_collate,
                            num_workers=config.num_workers, persistent_workers=False)
        aug_gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch * 1_009 + dist.rank)
        model.train()
        losses, n_seen = [], 0
        for batch in loader:
            good = []
            for item in batch:
                if item["error"] is not None:
                    sid = train_slides[item["index"]].slide_id
                    log.warning("epoch %d: slide %s skipped: %s", epoch, sid, item["error"])
                    skipped.append(sid)
                else:
                    good.append(item)
            if dist.enabled:  # every rank must step together: a rank without slides would hang the all-reduce
                good = dist_utils.agree_nonempty(good)
            if not good:
                continue
            patches = [item["patches"] for item in good]
            if config.sampler == "attention":
                rng = np.random.default_rng([config.seed, epoch, step])
                patches = [_select_attention_topk(model, ema.module, p, config, device, pad_to, rng) for p in patches]
            sizes = {len(p) for p in patches}
            if len(sizes) > 1:  # only possible with batch_slides > 1 and no padding; keep the batch square
                n_min = min(sizes)
                patches = [p[:n_min] for p in patches]
            stacked = torch.stack(patches).to(device, non_blocking=True)  # [B, n, p, p, 3]
            b, n = stacked.shape[:2]
            images = random_resized_crop_flip(to_float_images(stacked.flatten(0, 1)), crop, config.rrc_scale_min,
                                              config.hflip, config.vflip, aug_gen).view(b, n, 3, crop, crop)
            targets = task.make_targets([train_slides[i["index"]].target for i in good],
                                        [train_slides[i["index"]].slide_id for i in good]).to(device)
            set_lr(optimizer, config.lr * cosine_schedule(step, total_steps, warmup_steps, config.min_lr_ratio))
            try:
                with torch.autocast(device_type="cuda", dtype=torch.float16,
                                    enabled=config.amp and device.type == "cuda"):
                    output = train_model(images)
                    loss = task.loss(output.logits.float(), targets)
                    for aux in output.aux_losses.values():
                        loss = loss + aux
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if _is_oom(error):
                    raise RuntimeError(_oom_message(config, f"training epoch {epoch}")) from error
                raise
            if ema is not None:
                ema.update(model)
            losses.append(float(loss.detach()))
            n_seen += b
            step += 1
        if dist.enabled:
            dist_utils.sync_buffers(model)
        train_time += time.perf_counter() - epoch_start
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                               "lr": optimizer.param_groups[0]["lr"], "slides": n_seen,
                               "epoch_time": time.perf_counter() - epoch_start}
        if val_slides:
            val = evaluate_slides(model, val_slides, task, config, device)
            row["val_loss"] = val.loss
            row.update({f"val_{k}": v for k, v in val.metrics.items()})
            value = val.loss if monitor == "loss" else val.metrics.get(monitor, float("nan"))
            if _improved(value, val.loss, best_value, best_loss, mode):
                best_value, best_loss, best_epoch, stale = value, val.loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                if checkpoint_dir is not None and dist.is_main:
                    ckpt.save_best(checkpoint_dir, best_state, epoch, float(value))
            else:
                stale += 1
        else:
            best_epoch, best_state = epoch, None
        snapshot = {}
        if snapshot_pool:
            snapshot = evaluate_slides(model, snapshot_pool, task, config, device, with_metrics=False).attention
            snapshots[epoch] = snapshot
        history.append(row)
        if dist.is_main and not config.quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if callbacks:
            model.eval()
            for callback in callbacks:
                callback(EpochState(epoch, model, row, snapshot, config))
        stop = config.patience is not None and stale > config.patience and epoch + 1 >= config.min_epochs
        if checkpoint_dir is not None and dist.is_main:
            state = {"config": config.to_dict(), "history": history, "skipped": skipped, "train_time": train_time,
                     "step": step, "stopped": stop,
                     "best": {"epoch": best_epoch, "value": best_value, "loss": best_loss, "stale": stale}}
            ckpt.save_training_checkpoint(checkpoint_dir, epoch, model, ckpt.optimizer_state(optimizer, scaler),
                                          state, ema.module if ema is not None else None,
                                          {"snapshots": ckpt.snapshots_to_tensors(snapshots)})
        if stop:
            break

    last_state = copy.deepcopy(model.state_dict()) if best_state is not None else None
    test_last = None
    if test_slides and last_state is not None:
        test_last = evaluate_slides(model, test_slides, task, config, device).metrics
    if best_state is not None:
        model.load_state_dict(best_state)
    val_out = evaluate_slides(model, val_slides, task, config, device) if val_slides else None
    test_out = evaluate_slides(model, test_slides, task, config, device) if test_slides else None
    if test_out is not None and test_last is None:
        test_last = test_out.metrics
    test_ema = evaluate_slides(ema.module, test_slides, task, config, device).metrics if (ema and test_slides) else None
    frames, attention = [], {}
    for split, out in (("val", val_out), ("test", test_out)):
        if out is not None and len(out.predictions):
            frames.append(out.predictions.assign(split=split))
            attention.update(out.attention)
            skipped += out.skipped
    return E2EResult(
        history=pd.DataFrame(history),
        best_epoch=best_epoch,
        monitor=monitor,
        val_metrics=val_out.metrics if val_out else {},
        test_metrics=test_out.metrics if test_out else None,
        test_metrics_last=test_last,
        predictions=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        attention=attention,
        attention_snapshots=snapshots,
        wall_time=time.perf_counter() - start_wall,
        train_time=train_time,
        n_skipped=len(skipped),
        skipped_slides=skipped,
        config=config.to_dict(),
        test_metrics_ema=test_ema,
        model=model if keep_model else None,
    )



# ------------------------------------------------------------------------------------------------- data sources
def toy_slides(n_slides: int, n_patches: int = 24, size: int = 16, seed: int = 0, n_low: int = 8,
               witness_rate: float = 0.25, contrast: float = 1.0) -> list[E2ESlide]:
    """A hand-built in-memory cohort for tests and benchmarks: grey-noise patches, label 1 on odd slides, whose
    ``witness_rate`` share of main-scale patches (at least one) is red (``instance_labels`` = 1); ``contrast`` < 1
    blends the red with the grey noise (0 = invisible). No slide files involved."""
    if not 0.0 <= contrast <= 1.0 or not 0.0 < witness_rate <= 1.0:
        raise ValueError(f"toy_slides: contrast must be in [0, 1] and witness_rate in (0, 1], got {contrast}, "
                         f"{witness_rate}")
    rng = np.random.default_rng(seed)
    out = []
    side = int(np.ceil(np.sqrt(n_patches)))
    coords = np.stack([np.arange(n_patches) % side, np.arange(n_patches) // side], 1) * 64
    for i in range(n_slides):
        label = i % 2
        main = rng.integers(90, 160, size=(n_patches, size, size, 3), dtype=np.uint8)
        low = rng.integers(90, 160, size=(n_low, size, size, 3), dtype=np.uint8)
        truth = np.zeros(n_patches, np.int64)
        if label:
            witness = rng.choice(n_patches, size=max(1, int(round(n_patches * witness_rate))), replace=False)
            red = np.array([230, 40, 40], np.float32)
            main[witness] = np.rint((1 - contrast) * main[witness] + contrast * red).astype(np.uint8)
            truth[witness] = 1
        out.append(E2ESlide(f"toy_{i:03d}", label, coords.copy(), main, low, instance_labels=truth))
    return out


def split_slides(slides: Sequence[E2ESlide], splits: Mapping[str, str]) -> dict[str, list[E2ESlide]]:
    """Group slides by ``splits[slide_id]`` ("train" | "val" | "test"); slides without a split are left out."""
    out: dict[str, list[E2ESlide]] = {"train": [], "val": [], "test": []}
    for slide in slides:
        split = splits.get(slide.slide_id)
        if split in out:
            out[split].append(slide)
    return out


def build_task(spec: Mapping[str, Any] | None, targets: Sequence[Any]) -> Task:
    """A task from a config mapping ``{type: classification|grading|survival, classes: [...], n_bins: 4}``."""
    from milstudy.train.tasks import ClassificationTask, GradingTask, SurvivalTask

    spec = dict(spec or {})
    kind = spec.pop("type", "classification")
    if kind == "classification":
        classes = spec.pop("classes", None) or sorted({t for t in targets})
        return ClassificationTask(classes, **spec)
    if kind == "grading":
        return GradingTask(**spec)
    if kind == "survival":
        return SurvivalTask(**spec)
    raise ValueError(f"task type must be classification, grading or survival, got {kind!r}")


def _assign_splits(manifest: pd.DataFrame, spec: Mapping[str, Any], seed: int) -> pd.DataFrame:
    """The ``split`` column a run uses: ``fold: k`` takes column ``fold_k`` (train/test, e.g. the upstream survival
    folds) and carves a patient-level validation share ``val_fraction`` (default 0.125, spec pitfall 4: never select
    on test) out of its train cases; without a split column, a patient-level 70/15/15 split."""
    from milstudy.data.manifests import patient_split

    stratify = spec.get("stratify") or next((c for c in ("label", "event") if c in manifest.columns), None)
    if spec.get("fold") is not None:
        column = f"fold_{int(spec['fold'])}"
        if column not in manifest.columns:
            folds = sorted(c for c in manifest.columns if c.startswith("fold_"))
            raise ValueError(f"data.fold={spec['fold']}: the manifest has no column {column!r} (folds: {folds})")
        manifest = manifest.assign(split=manifest[column].astype(str))
        val_fraction = float(spec.get("val_fraction", 0.125))
        if val_fraction > 0 and not (manifest["split"] == "val").any():
            train = manifest[manifest["split"] == "train"]
            carved = patient_split(train, val=val_fraction, test=0.0, stratify=stratify, seed=seed)
            manifest.loc[carved.index, "split"] = carved["split"].astype(str)
        return manifest
    if "split" not in manifest.columns:
        return patient_split(manifest, stratify=stratify, seed=seed)
    return manifest


def load_data(spec: Mapping[str, Any], seed: int = 0, load_banks: bool = True) -> tuple[dict[str, list[E2ESlide]], Task]:
    """Slides per split and the task from a run file's data section.

    ``spec`` keys: ``toy: {n_slides: 8, ...}`` (in-memory toy cohort) | ``cohort: {profile: smoke}`` (synthetic
    cohort from ``milstudy.data.synthetic.cohort_for_profile``) | ``manifest: path`` + ``slide_root``; plus
    ``task`` (see ``build_task``), ``main_mpp``, ``patch_size``, ``low_factor``, ``target`` (column name, or
    ``[survival_months, event]``), ``by_case`` (one bag per ``case_id``, see :func:`cases_from_slides`) and
    ``fold`` / ``val_fraction`` (see :func:`_assign_splits`).
    """
    task_spec = spec.get("task")
    if "toy" in spec:
        slides = toy_slides(**spec["toy"])
        n = len(slides)
        n_val = max(2, n // 5)
        splits = {s.slide_id: ("val" if i >= n - n_val else "train") for i, s in enumerate(slides)}
        return split_slides(slides, splits), build_task(task_spec, [s.target for s in slides])
    if "cohort" in spec:
        from milstudy.data.synthetic import cohort_for_profile

        cohort = cohort_for_profile(**{"seed": seed, **spec["cohort"]})
        manifest = cohort.manifest
    elif "manifest" in spec:
        from milstudy.data.manifests import load_manifest

        manifest = load_manifest(spec["manifest"], slide_root=spec.get("slide_root"))
    else:
        raise ValueError("data spec needs one of 'toy', 'cohort' or 'manifest' (with 'slide_root')")
    manifest = _assign_splits(manifest, spec, seed)
    target = spec.get("target", "label")
    slides = slides_from_manifest(manifest, target if isinstance(target, str) else tuple(target),
                                  float(spec.get("main_mpp", 2.0)), int(spec.get("patch_size", 32)),
                                  int(spec.get("low_factor", 2)), load_banks=load_banks)
    if not slides:
        source = spec.get("manifest", "the cohort")
        raise ValueError(f"{source}: none of its {len(manifest)} slides could be opened and tiled (slide root "
                         f"{spec.get('slide_root')}); `milstudy data check --manifest M --slide-root R` lists why")
    splits = dict(zip(manifest["slide_id"].astype(str), manifest["split"].astype(str)))
    if spec.get("by_case"):  # one bag per case; manifests are validated to keep a case in one split
        case_of = dict(zip(manifest["slide_id"].astype(str), manifest["case_id"].astype(str)))
        splits = {case_of[sid]: split for sid, split in splits.items()}
        slides = cases_from_slides(slides, case_of)
    return split_slides(slides, splits), build_task(task_spec, [s.target for s in slides])


# -------------------------------------------------------------------------------------------------------- grids
def run_grid(
    configs: Mapping[str, E2EConfig],
    data: Mapping[str, Sequence[E2ESlide]],
    task: Task,
    seeds: Sequence[int],
    callbacks: Sequence[Callable[[EpochState], None]] = (),
    progress: bool = True,
) -> pd.DataFrame:
    """Train every named config for every seed; one row per run with test/val metrics, epochs and wall time.

    Names whose configs are identical (e.g. the default setting of every Table 7 ablation) are trained once per seed
    (training is deterministic given the config); the later rows copy the first one's and name it in ``same_as``.
    """
    from tqdm.auto import tqdm

    rows = []
    done: dict[str, dict] = {}
    jobs = [(name, seed) for name in configs for seed in seeds]
    for name, seed in tqdm(jobs, desc="E2E runs", disable=not progress):
        config = replace(configs[name], seed=int(seed))
        key = repr(config)
        if key in done and not callbacks:
            rows.append({**done[key], "run": name, "same_as": done[key]["run"]})
            continue
        result = train_e2e(data, task, config, callbacks)
        row = {"run": name, "seed": seed, "best_epoch": result.best_epoch, "epochs": len(result.history),
               "wall_time_s": result.wall_time, "train_time_s": result.train_time, "skipped": result.n_skipped}
        row.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
        row.update({f"val_{k}": v for k, v in result.val_metrics.items()})
        rows.append(row)
        done[key] = row
    frame = pd.DataFrame(rows)
    if "same_as" in frame:
        frame["same_as"] = frame["same_as"].fillna("")
    return frame


def summarize_grid(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean ± std over seeds per run for ``metrics`` (columns of ``run_grid``'s frame) and wall time."""
    cols = [m for m in metrics if m in frame] + ["wall_time_s"]
    grouped = frame.groupby("run", sort=False)[cols]
    mean, std = grouped.mean(), grouped.std(ddof=0)
    out = pd.DataFrame(index=mean.index)
    for col in cols:
        out[col] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[col], std[col])]
        out[f"{col}_mean"] = mean[col]
    out["n_seeds"] = grouped.size()
    return out.reset_index()


# ----------------------------------------------------------------------------------------------- study helpers
# Paper reference numbers (specs/abmilx.md §4.3 E2/E3, §5.3 Table 7): Grad. (PANDA acc) / Sub. (BRCA AUC) / Surv.
REFERENCE_E2 = pd.DataFrame(
    [("ABMIL", 75.46, 89.23, 62.70), ("DSMIL", 76.28, 91.09, 64.32), ("TransMIL", 75.08, 91.44, 63.42),
     ("RRTMIL", 17.99, 61.82, 53.42), ("QAMIL", 75.12, 90.65, 64.29), ("ViTMIL", 76.98, 92.61, 63.67),
     ("ABMILX", 78.34, 93.97, 67.78), ("Best FM, two-stage", 74.97, 94.84, 67.30)],
    columns=["aggregator", "paper_grad", "paper_sub", "paper_surv"],
)
REFERENCE_E3 = pd.DataFrame(
    [("attention sampling", 77.43, 93.14, 66.53, 68.0), ("single-scale random", 76.77, 92.72, 67.24, None),
     ("MRIS (r=4)", 78.34, 93.97, 67.78, 9.0)],
    columns=["sampler", "paper_grad", "paper_sub", "paper_surv", "paper_hours"],
)
REFERENCE_TABLE7 = pd.DataFrame(
    [("ffn", "without", 77.04, 93.97, 67.78), ("ffn", "with", 78.34, 93.03, 65.23),
     ("dim", "128", 76.22, 91.50, 62.64), ("dim", "256", 76.15, 93.97, 67.78), ("dim", "384", 76.01, 90.21, 64.13),
     ("dim", "512", 78.34, 91.51, 63.20),
     ("heads", "1", 73.74, 90.12, 63.57), ("heads", "2", 77.32, 90.91, 65.61), ("heads", "4", 78.34, 91.65, 62.83),
     ("heads", "8", 76.48, 93.97, 67.78), ("heads", "16", 76.50, 92.59, 64.62),
     ("ratio", "inf", 76.77, 92.72, 67.24), ("ratio", "2", 74.02, 92.74, 64.92), ("ratio", "4", 78.34, 93.97, 66.22),
     ("ratio", "6", 77.21, 92.35, 67.46), ("ratio", "10", 76.09, 92.25, 67.78),
     ("s", "64", 76.22, 93.07, 63.52), ("s", "128", 78.34, 93.86, 63.73), ("s", "384", 74.32, 92.52, 64.12),
     ("s", "512", 75.62, 93.97, 65.59), ("s", "768", None, 93.66, 67.78), ("s", "1280", None, 92.23, 65.77),
     ("sampler", "random", 78.34, 93.97, 67.78), ("sampler", "regional 2", 76.52, 93.26, 67.28),
     ("sampler", "regional 4", 76.11, 92.67, 67.23), ("sampler", "regional 8", None, 92.14, 67.00)],
    columns=["ablation", "setting", "paper_grad", "paper_sub", "paper_surv"],
)

# Paper-profile E2E settings (specs/abmilx.md §5.3, R18 columns): data spec + E2EConfig overrides per task.
PAPER_SETTINGS = {
    "brca_subtyping": dict(
        data={"manifest": "data_manifests/tcga_brca_subtyping.csv", "main_mpp": 1.0, "patch_size": 256,
              "task": {"type": "classification"}},
        config=dict(encoder="resnet18_trunc", optimizer="adamw", lr=8e-5, weight_decay=0.0, epochs=75,
                    warmup_epochs=10, patience=10, min_epochs=50, batch_slides=3, s=512, ratio=4, crop_size=224,
                    rrc_scale_min=0.25, hflip=False, vflip=False, ema_decay=0.9997,
                    aggregator_kwargs={"dim": 256, "heads": 8, "ffn": False})),
    "brca_survival": dict(
        data={"manifest": "data_manifests/tcga_brca_survival.csv", "main_mpp": 1.0, "patch_size": 256,
              "target": ["survival_months", "event"], "task": {"type": "survival", "n_bins": 4}, "by_case": True,
              "fold": 0},
        config=dict(encoder="resnet18_trunc", optimizer="adamw", lr=8e-5, weight_decay=5e-2, epochs=30,
                    warmup_epochs=5, patience=10, min_epochs=20, batch_slides=2, s=768, ratio=10, crop_size=224,
                    rrc_scale_min=0.08, hflip=False, vflip=False, ema_decay=None,
                    aggregator_kwargs={"dim": 256, "heads": 8, "ffn": False})),
    "panda": dict(
        data={"manifest": "data_manifests/panda.csv", "main_mpp": 0.25, "patch_size": 256,
              "task": {"type": "grading", "n_grades": 6}},
        config=dict(encoder="resnet18_trunc", optimizer="adam", lr=2e-4, weight_decay=1e-5, epochs=200,
                    warmup_epochs=0, patience=20, min_epochs=120, batch_slides=8, s=128, ratio=4, crop_size=224,
                    rrc_scale_min=0.08, hflip=True, vflip=True, ema_decay=0.9999,
                    aggregator_kwargs={"dim": 512, "heads": 4, "ffn": True})),
}


# Synthetic cohort of the ``cpu`` profile of the E2E study notebooks (11, 12): 2048-px slides (about 100-160 main-
# scale patches, so s = 16-32 is a real sample of the bag and the samplers differ), witness rate down to 1 % (so
# not every aggregator saturates at AUC 1), 100 slides (60 / 20 / 20 train / val / test).
CPU_COHORT = dict(n_slides=100, size_range=(2048, 2048), witness_rate_range=(0.01, 0.3))

# Aggregator sizes for the CPU profiles (spec §5.5, profile S: D = 64, m = 4). TransMIL at its paper width (512,
# 256 landmarks) costs 10x the rest on 2 cores; the CPU profiles use the same D / m for it.
CPU_AGGREGATOR_KWARGS = {name: {"dim": 64, "heads": 4} for name in ("abmilx", "transmil", "vitmil", "qamil")}


def aggregator_kwargs(name: str, profile: str) -> dict:
    """Constructor arguments of zoo model ``name`` for a notebook profile ({} = the model's defaults; paper: {})."""
    return {} if profile == "paper" else dict(CPU_AGGREGATOR_KWARGS.get(name, {}))


def profile_data(profile: str, task: str = "detection", seed: int = 0, n_slides: int | None = None,
                 paper_setting: str = "brca_subtyping") -> tuple[dict[str, list[E2ESlide]], Task, dict]:
    """Slides per split, the task and E2EConfig overrides for a notebook profile.

    smoke: the smoke synthetic cohort (12 slides of 1024 px, about 25-40 patches each; ``n_slides`` changes the
    count); cpu: ``CPU_COHORT`` (``n_slides`` slides of 2048 px, default 100, about 100-160 patches each) so a grid
    of E2E runs fits in minutes on 2 cores; paper: ``PAPER_SETTINGS[paper_setting]`` from data_manifests/ and
    MILSTUDY_SLIDE_ROOT (fails early with a clear message when it is not set). Grids and patch banks are cached.
    """
    from milstudy.paths import REPO_ROOT, slide_root

    if profile == "paper":
        root = slide_root()
        if root is None:
            raise RuntimeError("the paper profile needs the real slides: set MILSTUDY_SLIDE_ROOT to the folder that "
                               "holds the TCGA/PANDA slides listed in data_manifests/ (see README)")
        setting = PAPER_SETTINGS[paper_setting]
        spec = {**setting["data"], "manifest": str(REPO_ROOT / setting["data"]["manifest"]), "slide_root": str(root)}
        data, fitted = load_data(spec, seed=seed, load_banks=False)
        return data, fitted, dict(setting["config"], patch_cache=False)
    cohort: dict[str, Any] = {"profile": "smoke", "task": task}
    if profile == "cpu":
        cohort.update(CPU_COHORT)
    elif profile != "smoke":
        raise ValueError(f"profile must be smoke, cpu or paper, got {profile!r}")
    if n_slides:
        cohort["n_slides"] = int(n_slides)
    data, fitted = load_data({"cohort": cohort}, seed=seed)
    return data, fitted, {"aggregator_kwargs": aggregator_kwargs("abmilx", profile)}


def table7_configs(base: E2EConfig, ablations: Sequence[str] = ("ffn", "dim", "heads", "ratio", "s", "sampler"),
                   s_values: Sequence[int] | None = None, dims: Sequence[int] | None = None) -> dict[str, E2EConfig]:
    """The Table 7 grid around ``base`` (an ABMILX config): ``{"<ablation>: <setting>": config}``.

    Settings follow the paper (FFN without/with; D 128-512; m 1-16; r inf/2/4/6/10; s 64-1280; random vs regional
    2/4/8); ``s_values`` / ``dims`` replace the paper's s and D values for CPU-sized runs (D defaults to the paper's
    values when ``base`` uses D >= 128, else to 16/32/64/128).
    """
    kw = dict(base.aggregator_kwargs)
    kw.setdefault("ffn", False)  # explicit, so every ablation's default setting is the same config as ``base``
    base = replace(base, aggregator_kwargs=kw)
    dim = int(kw.get("dim", 64))
    grid: dict[str, E2EConfig] = {}
    for name in ablations:
        if name == "ffn":
            for label, flag in (("without", False), ("with", True)):
                grid[f"ffn: {label}"] = replace(base, aggregator_kwargs={**kw, "ffn": flag})
        elif name == "dim":
            for value in dims or ((128, 256, 384, 512) if dim >= 128 else (16, 32, 64, 128)):
                grid[f"dim: {value}"] = replace(base, aggregator_kwargs={**kw, "dim": value})
        elif name == "heads":
            for value in (1, 2, 4, 8, 16):
                if dim % value == 0:
                    grid[f"heads: {value}"] = replace(base, aggregator_kwargs={**kw, "heads": value})
        elif name == "ratio":
            for value in ("inf", 2, 4, 6, 10):
                grid[f"ratio: {value}"] = replace(base, sampler="mris", ratio=float(value))
        elif name == "s":
            for value in s_values or (64, 128, 384, 512, 768, 1280):
                grid[f"s: {value}"] = replace(base, s=int(value))
        elif name == "sampler":
            grid["sampler: random"] = replace(base, sampler="mris")
            for g in (2, 4, 8):
                grid[f"sampler: regional {g}"] = replace(base, sampler="regional", regions=g)
        else:
            raise ValueError(f"unknown Table 7 ablation {name!r}; choose from ffn, dim, heads, ratio, s, sampler")
    return grid


# The E2 aggregators by the names the paper's tables use (notebooks 11 and 14).
AGGREGATOR_NAMES = {"ABMIL": "abmil", "DSMIL": "dsmil", "TransMIL": "transmil", "QAMIL": "qamil", "ViTMIL": "vitmil",
                    "ABMILX": "abmilx", "Mean pooling": "mean_pooling"}


def available_aggregators(wanted: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """``{label: model name}`` restricted to names registered in the zoo (missing ones are reported, not fatal).

    ``wanted``: ``{label: model name}``, or labels of ``AGGREGATOR_NAMES`` (an unknown label is an error).
    """
    from milstudy.models import list_models

    if not isinstance(wanted, Mapping):
        unknown = [label for label in wanted if label not in AGGREGATOR_NAMES]
        if unknown:
            raise ValueError(f"unknown aggregator label(s) {unknown}; known: {list(AGGREGATOR_NAMES)}")
        wanted = {label: AGGREGATOR_NAMES[label] for label in wanted}
    known = set(list_models())
    missing = [f"{label} ({name})" for label, name in wanted.items() if name not in known]
    if missing:
        log.warning("not in the model zoo, left out: %s", ", ".join(missing))
    return {label: name for label, name in wanted.items() if name in known}


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m milstudy.train.e2e --config C.yaml | --preset NAME`` (or under ``torchrun --nproc_per_node=N``).

    ``--preset`` takes a paper setting (``PAPER_SETTINGS``: brca_subtyping, brca_survival, panda) with the slides
    under ``--slide-root``; ``--set key=value`` overrides single fields. The YAML holds E2EConfig fields plus a
    ``data`` section (see ``load_data``) and an optional ``out`` folder where rank 0 writes ``history.csv``,
    ``metrics.json``, ``predictions.csv`` and ``model.safetensors``, and per-epoch checkpoints under
    ``out/checkpoints`` (unless ``checkpoint_dir`` is set): rerunning the same command resumes an interrupted run.
    """
    import yaml

    from milstudy.train import distributed as dist_utils

    parser = argparse.ArgumentParser(prog="python -m milstudy.train.e2e", description=main.__doc__)
    parser.add_argument("--config", help="YAML: E2EConfig fields + data: {...} + out: DIR")
    parser.add_argument("--preset", choices=sorted(PAPER_SETTINGS),
                        help="a paper setting (specs/abmilx.md §5.3) on the manifests in data_manifests/")
    parser.add_argument("--slide-root", help="folder holding the slides of the manifest (default $MILSTUDY_SLIDE_ROOT)")
    parser.add_argument("--out", help="output folder (overrides the config's 'out')")
    parser.add_argument("--fold", type=int, help="use the manifest's fold_K column as the split (e.g. brca_survival: 0, 1, 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an E2EConfig field (YAML value), e.g. --set epochs=5 --set s=256")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.preset):
        parser.error("give exactly one of --config C.yaml or --preset NAME")
    if args.preset:
        from milstudy.paths import REPO_ROOT, slide_root

        root = slide_root(args.slide_root)
        if root is None:
            parser.error("--preset reads real slides: pass --slide-root or set MILSTUDY_SLIDE_ROOT")
        setting = PAPER_SETTINGS[args.preset]
        spec = dict(copy.deepcopy(setting["config"]), patch_cache=False)
        spec["data"] = {**setting["data"], "manifest": str(REPO_ROOT / setting["data"]["manifest"]),
                        "slide_root": str(root)}
    else:
        path = Path(args.config)
        if not path.is_file():
            parser.error(f"config file {path} not found")
        spec = yaml.safe_load(path.read_text()) or {}
        if args.slide_root and isinstance(spec.get("data"), dict):
            spec["data"]["slide_root"] = args.slide_root
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        spec[key.strip()] = yaml.safe_load(value)
    if args.out:
        spec["out"] = args.out
    if args.fold is not None:
        if not isinstance(spec.get("data"), dict):
            parser.error("--fold needs a 'data' section in the config")
        spec["data"]["fold"] = args.fold
    data_spec = spec.pop("data", None)
    out_dir = spec.pop("out", None)
    if out_dir and not spec.get("checkpoint_dir"):
        spec["checkpoint_dir"] = str(Path(out_dir) / "checkpoints")  # rerunning the command resumes
    if data_spec is None:
        parser.error("the config needs a 'data' section (toy / cohort / manifest)")
    config = E2EConfig.from_dict(spec)
    dist = dist_utils.init_from_env(config.device)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    try:
        data, task = load_data(data_spec, seed=config.seed, load_banks=config.patch_cache)
        result = train_e2e(data, task, config, keep_model=True)
        if dist.is_main:
            summary = {"val": result.val_metrics, "test": result.test_metrics, "best_epoch": result.best_epoch,
                       "wall_time_s": result.wall_time, "skipped": result.skipped_slides,
                       "world_size": dist.world_size, "final_train_loss": float(result.history["train_loss"].iloc[-1])}
            print(json.dumps(summary, default=float))
            if out_dir:
                from milstudy.train.checkpoint import atomic_write_json, save_weights

                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                result.history.to_csv(out / "history.csv", index=False)
                result.predictions.to_csv(out / "predictions.csv", index=False)
                atomic_write_json({**summary, "config": result.config}, out / "metrics.json")
                save_weights(result.model.state_dict(), out / "model.safetensors")
        if dist.enabled and out_dir:
            from milstudy.train.checkpoint import save_weights

            save_weights(result.model.state_dict(), Path(out_dir) / f"model_rank{dist.rank}.safetensors")
    finally:
        dist_utils.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
