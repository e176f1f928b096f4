"""Benchmark: forward+backward time and peak memory of every zoo model vs bag size N (issue 4 "Benchmarks").

Each (model, N) case runs in a fresh subprocess (2 torch threads, CPU, D=1024, batch 1): after a small warm-up
the process records its max RSS, runs a timed forward+backward on a bag of N instances (the faster of two runs
up to N=10k, one run above) and reports the max-RSS increase (``resource.getrusage``; tracemalloc does not see torch's CPU allocations). The memory slope is the
least-squares slope of log(peak memory) against log(N) per model (1 = linear). Cases whose extrapolated cost
exceeds the budget are skipped and the reason recorded. Targets: ABMIL at N=10k under 0.5 s; ABMILX (D=256,
m=8) at N=10k no slower than the authors' N x N implementation (about 20 s on this machine) with memory linear in N.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from milstudy.bench._subprocess import max_rss_mb, run_case

FEATURE_DIM = 1024
MODELS = [
    "mean_pooling",
    "max_pooling",
    "abmil",
    "abmil_gated",
    "clam_sb",
    "dsmil",
    "transmil",
    "qamil",
    "vitmil",
    "mhla",
    "abmilx_paper_brca_sub",  # D=256, m=8: the shapes of the authors' 20 s reference
]
QUADRATIC = {"abmilx_paper_brca_sub", "vitmil"}  # O(N²) time by design (A+; full self-attention); memory O(N)
MAX_CASE_SECONDS = 150.0
MAX_CASE_MB = 3000.0


def measure_case(name: str, n_instances: int, threads: int = 2) -> dict:
    """Run one timed forward+backward of ``name`` on a ``[1, n_instances, 1024]`` bag in this process."""
    import torch

    from milstudy.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, FEATURE_DIM, 2)
    kwargs = {"targets": torch.tensor([1])} if getattr(model, "needs_targets", False) else {}

    def step(x: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        model(x, **kwargs).logits.sum().backward()

    step(torch.randn(1, 256, FEATURE_DIM))  # warm-up: thread pools, allocator, kernels
    x = torch.randn(1, n_instances, FEATURE_DIM)
    model.zero_grad(set_to_none=True)
    baseline = max_rss_mb()
    seconds = []
    for _ in range(2 if n_instances <= 10_000 else 1):  # the first call at a new shape builds conv primitives
        start = time.perf_counter()
        step(x)
        seconds.append(time.perf_counter() - start)
    return {"fwd_bwd_s": min(seconds), "peak_mem_mb": max(max_rss_mb() - baseline, 0.0)}


def _memory_slope(frame: pd.DataFrame) -> float:
    ok = frame[(frame.status == "ok") & (frame.peak_mem_mb > 0)]
    if len(ok) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ok.n_instances), np.log(ok.peak_mem_mb), 1)[0])


def _plot(frame: pd.DataFrame, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from milstudy.plots_rank import loglog_cost_axes

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in frame[frame.status == "ok"].groupby("model"):
        axes[0].plot(rows.n_instances, rows.fwd_bwd_s, marker="o", label=name)
        axes[1].plot(rows.n_instances, rows.peak_mem_mb.clip(lower=1.0), marker="o", label=name)
    loglog_cost_axes(axes, "instances per bag N (D=1024, CPU)", ("forward+backward time (s)", "peak memory increase (MB)"))
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Model zoo cost vs bag size")
    fig.tight_layout()
    tmp = out_dir / "models.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_dir / "models.png")


def run(out_dir: Path, quick: bool = False) -> pd.DataFrame:
    """Measure every model of ``MODELS`` at N in {1k, 10k, 50k} (quick: {500, 2000}); returns one row per case."""
    from tqdm import tqdm

    sizes = [500, 2000] if quick else [1000, 10_000, 50_000]
    rows = []
    for name in tqdm(MODELS, desc="models bench"):
        previous = None
        for n in sizes:
            row = {"model": name, "n_instances": n, "feature_dim": FEATURE_DIM}
            if previous is not None and previous.get("status") != "ok":
                row["status"] = f"skipped: N={previous['n_instances']} did not finish"
            elif previous is not None:
                power = 2.0 if name in QUADRATIC else 1.0
                grow = n / previous["n_instances"]
                est_s, est_mb = previous["fwd_bwd_s"] * grow**power, previous["peak_mem_mb"] * grow
                if est_s > MAX_CASE_SECONDS or est_mb > MAX_CASE_MB:
                    row["status"] = f"skipped: extrapolated {est_s:.0f} s / {est_mb:.0f} MB exceeds the budget"
            if "status" not in row:
                row.update(run_case("milstudy.bench.models", "measure_case", name, n, timeout=3 * MAX_CASE_SECONDS))
            rows.append(row)
            previous = row
    frame = pd.DataFrame(rows)
    for column in ("fwd_bwd_s", "peak_mem_mb"):
        if column not in frame:
            frame[column] = math.nan
    slopes = {name: _memory_slope(rows) for name, rows in frame.groupby("model")}
    frame["memory_slope_loglog"] = frame.model.map(slopes)
    frame = frame[["model", "n_instances", "feature_dim", "fwd_bwd_s", "peak_mem_mb", "memory_slope_loglog", "status"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(frame, out_dir)
    return frame.round({"fwd_bwd_s": 3, "peak_mem_mb": 1, "memory_slope_loglog": 2})
