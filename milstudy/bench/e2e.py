"""End-to-end training benchmark (issue 5, "Benchmarks"; ABMILX spec §4.3 E3 and E9).

Measures on CPU, with the in-memory toy cohort of ``milstudy.train.e2e.toy_slides`` (so the numbers isolate the
trainer, not slide decoding):

- ``train``: E2E training throughput (slides/s, patches/s) and peak resident memory for s in {64, 128, 256}
  (``tiny_cnn`` on 32-px patches; ``resnet18_trunc`` on 224-px crops of 256-px patches unless ``quick``).
- ``loader``: patches/s of the patch sources against the CPU encoder's patches/s (fwd + bwd, tiny_cnn): reading
  from a real pyramidal TIFF through OpenSlide with ``PatchDataset`` in a DataLoader with 2 workers, and slicing
  the in-memory bank. Target (issue 5): loader >= 2x encoder, so training is never data-bound.
- ``sampling_cost``: per-epoch training time with attention sampling (EMA scoring of every patch under no-grad,
  then the trainable pass on the top-s) over random (single-scale) and MRIS sampling: median of steady-state
  epochs after a warm-up run; the paper reports 68 h vs 9 h (≈ 7.6x) on TCGA-BRCA.
The aggregator is mean pooling with attention from the zoo when available (``abmil``), else any registered model.
"""

from __future__ import annotations

import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _aggregator() -> str:
    from milstudy.models import list_models

    names = list_models()
    for preferred in ("abmil", "abmilx", "mean_pooling", "mean"):
        if preferred in names:
            return preferred
    if not names:
        from milstudy.models.base import MILOutput, register_model

        class _AttnPool(torch.nn.Module):
            def __init__(self, in_dim: int, n_out: int) -> None:
                super().__init__()
                self.score, self.head = torch.nn.Linear(in_dim, 1), torch.nn.Linear(in_dim, n_out)

            def forward(self, x, coords=None, mask=None):
                w = torch.softmax(self.score(x).squeeze(-1), 1)
                return MILOutput(self.head((w.unsqueeze(-1) * x).sum(1)), w.unsqueeze(1))

        register_model("bench_attention_pool")(lambda in_dim, n_out, **kw: _AttnPool(in_dim, n_out))
        return "bench_attention_pool"
    return names[0]


def _train_rows(quick: bool) -> list[dict]:
    from milstudy.data.e2e_slides import toy_slides
    from milstudy.train.e2e import E2EConfig, train_e2e
    from milstudy.train.tasks import ClassificationTask

    aggregator = _aggregator()
    setups = [("tiny_cnn", 32, None, {})]
    if not quick:
        setups.append(("resnet18_trunc", 256, 224, {}))
    rows = []
    for encoder, size, crop, kw in setups:
        for s in (64, 128, 256):
            if encoder == "resnet18_trunc" and s > 64:
                continue  # minutes per step on 2 cores; one point is enough to state the ratio
            n_slides = 4 if quick or encoder != "tiny_cnn" else 8
            slides = toy_slides(n_slides, n_patches=s + 32, size=size, n_low=s // 2)
            config = E2EConfig(encoder=encoder, encoder_kwargs=kw, aggregator=aggregator, s=s, ratio=4, epochs=1,
                               batch_slides=2, crop_size=crop, warmup_epochs=0, device="cpu")
            start = time.perf_counter()
            result = train_e2e({"train": slides}, ClassificationTask(2), config)
            elapsed = result.train_time
            rows.append({"benchmark": "train", "encoder": encoder, "patch_px": crop or size, "s": s,
                         "batch_slides": 2, "slides_per_s": n_slides / elapsed,
                         "patches_per_s": n_slides * s / elapsed, "seconds": elapsed,
                         "peak_rss_mb": _peak_rss_mb(), "note": f"aggregator={aggregator}, 1 epoch, fp32",
                         "wall_s": time.perf_counter() - start})
    return rows


def _loader_rows(quick: bool) -> list[dict]:
    from torch.utils.data import DataLoader

    from milstudy.data.patches import PatchDataset, collate_patches, extract_patch_bank
    from milstudy.data.synthetic import cohort_for_profile
    from milstudy.data.tiling import multiscale_grid
    from milstudy.encoders import build_encoder

    rows = []
    cohort = cohort_for_profile("smoke")
    path = cohort.manifest["path"].iloc[0]
    grid = multiscale_grid(path, 2.0, 32, 2).main
    n = len(grid)
    repeats = max(1, (512 if quick else 8192) // max(n, 1))
    dataset = torch.utils.data.ConcatDataset([PatchDataset(path, grid)] * repeats)
    loader = DataLoader(dataset, batch_size=64, num_workers=2, collate_fn=collate_patches)
    start = time.perf_counter()
    batches = iter(loader)
    n_first = len(next(batches)["images"])
    first = time.perf_counter()
    total = n_first + sum(len(batch["images"]) for batch in batches)
    end = time.perf_counter()
    rows.append({"benchmark": "loader", "source": "OpenSlide PatchDataset, 2 workers", "patch_px": 32,
                 "patches_per_s": total / (end - start), "seconds": end - start,
                 "note": f"{total} patches incl. worker start ({first - start:.2f} s to the first batch)"})
    rows.append({"benchmark": "loader", "source": "OpenSlide PatchDataset, 2 workers, after the first batch",
                 "patch_px": 32, "patches_per_s": (total - n_first) / (end - first), "seconds": end - first,
                 "note": "steady state"})
    bank = extract_patch_bank(path, grid)
    index = np.random.default_rng(0).integers(0, len(bank), size=(64, 64))
    start = time.perf_counter()
    for rows_idx in index:
        torch.from_numpy(bank[rows_idx]).movedim(-1, -3).float().div_(255.0)
    elapsed = time.perf_counter() - start
    rows.append({"benchmark": "loader", "source": "in-memory patch bank", "patch_px": 32,
                 "patches_per_s": index.size / elapsed, "seconds": elapsed, "note": "random index + to float"})
    encoder = build_encoder("tiny_cnn")
    x = torch.rand(128, 3, 32, 32)
    encoder(x).sum().backward()  # warm-up
    steps = 2 if quick else 5
    start = time.perf_counter()
    for _ in range(steps):
        encoder(x).sum().backward()
    elapsed = time.perf_counter() - start
    encoder_rate = steps * 128 / elapsed
    rows.append({"benchmark": "loader", "source": "tiny_cnn encoder fwd+bwd (CPU)", "patch_px": 32,
                 "patches_per_s": encoder_rate, "seconds": elapsed, "note": "the rate the loader must beat 2x"})
    for row in rows[:-1]:
        row["loader_over_encoder"] = row["patches_per_s"] / encoder_rate
    return rows


def _epoch_times(slides, aggregator: str, sampler: str, epochs: int) -> list[float]:
    """Training seconds of each epoch (sampling + scoring + fwd/bwd/step; no validation) of one run."""
    from milstudy.train.e2e import E2EConfig, train_e2e
    from milstudy.train.tasks import ClassificationTask

    config = E2EConfig(aggregator=aggregator, sampler=sampler, s=64, ratio=4, epochs=epochs, batch_slides=2,
                       warmup_epochs=0, device="cpu", eval_chunk=512)
    result = train_e2e({"train": slides}, ClassificationTask(2), config)
    return [float(t) for t in result.history["train_time"]]


def _sampling_cost_rows(quick: bool) -> list[dict]:
    """Per-epoch training time with attention sampling over random sampling (the paper's 68 h vs 9 h, E3).

    Attention sampling encodes every patch of each slide under no-grad with the EMA model to pick the top-s, then
    trains on those s; random / MRIS sampling only encodes the s sampled patches. Each sampler trains for
    ``1 + repeats`` epochs after a warm-up run (imports, allocator); the first epoch of each run is dropped and the
    median of the rest is reported, so the ratio compares steady-state epochs.
    """
    from milstudy.data.e2e_slides import toy_slides

    aggregator = _aggregator()
    n_patches = 256 if quick else 512  # the paper's slides hold ~3,000 patches at 10x for s = 512
    repeats = 2 if quick else 4
    slides = toy_slides(4, n_patches=n_patches, size=32, n_low=64)
    _epoch_times(slides, aggregator, "random", 1)  # warm-up
    medians = {}
    for sampler in ("random", "mris", "attention"):
        medians[sampler] = float(np.median(_epoch_times(slides, aggregator, sampler, 1 + repeats)[1:]))
    return [{"benchmark": "sampling_cost", "s": 64, "patches_per_slide": n_patches,
             "seconds": medians["attention"], "random_seconds": medians["random"], "mris_seconds": medians["mris"],
             "attention_over_random": medians["attention"] / medians["random"],
             "attention_over_mris": medians["attention"] / medians["mris"],
             "note": f"median training s/epoch over {repeats} epochs after warm-up, {torch.get_num_threads()} "
                     f"thread(s); paper: 68 h / 9 h = 7.6x (TCGA-BRCA, ~3,000 patches/slide, s=512)"}]


def run(out_dir: Path, quick: bool = False) -> pd.DataFrame:
    """All three benchmarks as one long table (see the module docstring)."""
    torch.set_num_threads(2)
    rows = _train_rows(quick) + _loader_rows(quick) + _sampling_cost_rows(quick)
    return pd.DataFrame(rows)
