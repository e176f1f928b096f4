"""Benchmark: exact 2-D local attention vs dense and full attention, time and memory vs N (LongMIL spec
``shared/specs/longmil.md`` §4.2, Figs. 1 and 7; goals of project issue 13).

One head, d = 64, forward + backward (sum of the output times a fixed random cotangent), float32, CPU, on an
irregular foreground filling about 70 % of a square grid (:func:`milstudy.data.synthetic.foreground
.irregular_foreground`), radius r = 10 grid units. Implementations:

- ``local_tiled``: :func:`milstudy.models.local_attention.local_attention_2d` (its neighbour plan included);
- ``sdpa_masked``: ``F.scaled_dot_product_attention`` with the dense boolean N x N mask D <= r (building the
  mask from the coordinates included in the time);
- ``sdpa_fused``: ``F.scaled_dot_product_attention`` without mask (torch's fused CPU kernel), full attention;
- ``chunked_full``: :func:`~milstudy.models.local_attention.full_attention_2d_alibi` without slopes (exact
  query-chunked full attention, memory O(chunk N)).

Each (implementation, N) point runs in a fresh subprocess (``THREADS`` torch threads): a warm-up at N = 512, then
the peak-RSS increase over the timed runs (the kernel's peak counter ``VmHWM`` reset after the warm-up, so earlier
peaks do not hide the run's; inputs, outputs and gradients included); the time is the median of up to 3 runs (1
above 5 s). A point whose extrapolation from the previous one (time ~ N for the local kernel, N² for the others;
memory ~ N, N² for the dense mask) exceeds ``MAX_CASE_S`` or :func:`memory_cap_mb` (``MAX_CASE_MB`` or half the
memory available) is skipped with the reason. FLOPs: 14 d per (query, key) pair for forward + backward (QKᵀ and PV; recomputed QKᵀ,
dO Vᵀ, Pᵀ dO, dS K, dSᵀ Q); *computed* pairs are the kernel's padded score entries (N² for the dense ones),
*useful* pairs those within r. The dense matmul rate (2048³ float32, same threads) is measured at the start and
the end of the run; its drift and the load average flag contention. Goals: :data:`GOALS`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from milstudy.bench._subprocess import peak_rss_mb, reset_peak_rss, run_call

IMPLEMENTATIONS = ("local_tiled", "sdpa_masked", "sdpa_fused", "chunked_full")
DIM, RADIUS, FILL, THREADS = 64, 10.0, 0.7, 1
SIZES = (1000, 2000, 4000, 8000, 16000, 32000, 64000)
LOCAL_EXTRA = (100_000,)
QUICK_SIZES = (500, 1000, 2000)
MAX_CASE_S, MAX_CASE_MB = 150.0, 12000.0
FLOPS_PER_PAIR = 14 * DIM
GOALS = (  # (key, text, target): issue 13, evaluated by goal_table
    ("speedup_masked_16k", "local >= 20x faster than dense masked SDPA at N=16k", 20.0),
    ("speedup_fused_64k", "local >= 25x faster than unmasked fused SDPA at N=64k", 25.0),
    ("memory_4n", "local peak memory at 4N below 5x that at N (16k -> 64k)", 5.0),
    ("memory_100k", "local fwd+bwd at N=100k within 2 GB", 2048.0),
    ("computed_over_useful", "local computed / useful pairs <= 3 (N=16k)", 3.0),
)


def memory_cap_mb() -> float:
    """The largest extrapolated peak a point may have: ``MAX_CASE_MB`` or half the memory available now."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return min(MAX_CASE_MB, int(line.split()[1]) / 1024.0 / 2)
    except OSError:
        pass
    return MAX_CASE_MB


def matmul_case(threads: int = THREADS, size: int = 2048) -> dict:
    """``{"gflops": best of 3 dense float32 size³ matmuls in GFLOP/s}`` with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * size**3 / best / 1e9}


def _step(impl: str, n: int, seed: int = 0):
    """(inputs, function running one forward + backward) for one implementation on an N-token foreground."""
    import torch
    import torch.nn.functional as F

    from milstudy.data.synthetic.foreground import irregular_foreground
    from milstudy.models.local_attention import full_attention_2d_alibi, local_attention_2d

    gen = torch.Generator().manual_seed(seed)
    coords = torch.as_tensor(irregular_foreground(n, fill=FILL, seed=seed))[None]
    q, k, v = (torch.randn(1, 1, n, DIM, generator=gen).requires_grad_() for _ in range(3))
    cotangent = torch.randn(1, 1, n, DIM, generator=gen)

    def attend():
        if impl == "local_tiled":
            return local_attention_2d(q, k, v, coords, RADIUS)
        if impl == "sdpa_masked":
            diff = coords[0][:, None, :] - coords[0][None, :, :]
            keep = (diff * diff).sum(-1) <= int(RADIUS * RADIUS)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if impl == "sdpa_fused":
            return F.scaled_dot_product_attention(q, k, v)
        if impl == "chunked_full":
            return full_attention_2d_alibi(q, k, v, coords, None)
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}; got {impl!r}")

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        (attend() * cotangent).sum().backward()

    return step


def measure_case(impl: str, n: int, threads: int = THREADS) -> dict:
    """One point in this process: warm-up at N = 512, then time (median) and max-RSS increase of fwd + bwd."""
    import torch

    torch.set_num_threads(threads)
    _step(impl, 512)()
    baseline = reset_peak_rss()
    step = _step(impl, n)
    seconds = []
    while len(seconds) < 3 and (not seconds or seconds[-1] < 5.0):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {"time_s": statistics.median(seconds), "runs": len(seconds), "peak_mem_mb": max(peak_rss_mb() - baseline, 0.0)}


def dense_matmul_rate() -> float:
    """GFLOP/s of a dense 2048³ float32 matmul in a fresh subprocess with the bench's threads."""
    return float(_subprocess("matmul_case()", 300)["gflops"])


def _subprocess(call: str, timeout: float) -> dict:
    return run_call("milstudy.bench.local_attention", call, timeout, THREADS)


def pair_counts(impl: str, n: int) -> tuple[int, int]:
    """(computed, useful) (query, key) pairs of one head: the tiled plan's padded entries or N² for the dense
    implementations; useful = pairs within r for the local / masked ones, N² for full attention."""
    import torch

    from milstudy.data.synthetic.foreground import irregular_foreground
    from milstudy.models.local_attention import local_attention_pairs

    if impl in ("sdpa_fused", "chunked_full"):
        return n * n, n * n
    stats = local_attention_pairs(torch.as_tensor(irregular_foreground(n, fill=FILL, seed=0)), RADIUS)
    return (stats["computed"] if impl == "local_tiled" else n * n), stats["useful"]


def _skip_reason(impl: str, n: int, previous: dict | None) -> str | None:
    if previous is None:
        return None
    if previous.get("status") != "ok":
        return f"skipped: N={previous['n']} did not finish"
    grow = n / previous["n"]
    est_s = previous["time_s"] * grow ** (1 if impl == "local_tiled" else 2)
    est_mb = previous["peak_mem_mb"] * grow ** (2 if impl == "sdpa_masked" else 1)
    cap_mb = memory_cap_mb()
    if est_s > MAX_CASE_S or est_mb > cap_mb:
        return f"skipped: extrapolated {est_s:.0f} s / {est_mb:.0f} MB exceeds {MAX_CASE_S:.0f} s / {cap_mb:.0f} MB"
    return None


def loglog_slope(n: pd.Series, values: pd.Series, min_n: int = 4000) -> float:
    """Least-squares slope of log(values) on log(n) over the points with n >= min_n and values > 0 (NaN if < 2)."""
    keep = (n >= min_n) & (values > 0) & values.notna()
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(n[keep]), np.log(values[keep]), 1)[0])


def measure_grid(sizes: dict[str, tuple[int, ...]], timeout: float = 3 * MAX_CASE_S) -> pd.DataFrame:
    """One row per (implementation, N) of ``sizes`` (each point in a fresh subprocess, skip rule above)."""
    from tqdm import tqdm

    rows = []
    cases = [(impl, n) for impl, ns in sizes.items() for n in ns]
    previous: dict[str, dict] = {}
    for impl, n in tqdm(cases, desc="local-attention bench"):
        row = {"impl": impl, "n": n}
        reason = _skip_reason(impl, n, previous.get(impl))
        row.update({"status": reason} if reason else _subprocess(f"measure_case({impl!r}, {n})", timeout))
        computed, useful = pair_counts(impl, n)
        row.update({"computed_pairs": computed, "useful_pairs": useful})
        rows.append(row)
        previous[impl] = row
    frame = pd.DataFrame(rows)
    for column in ("time_s", "peak_mem_mb", "runs"):
        if column not in frame:
            frame[column] = math.nan
    return frame


def add_rates(frame: pd.DataFrame, matmul_rate: float) -> pd.DataFrame:
    """FLOP columns, share of the dense matmul rate, per-implementation log-log slopes of time and memory."""
    out = frame.copy()
    out["computed_over_useful"] = out.computed_pairs / out.useful_pairs
    out["gflops_computed"] = FLOPS_PER_PAIR * out.computed_pairs / out.time_s / 1e9
    out["gflops_useful"] = FLOPS_PER_PAIR * out.useful_pairs / out.time_s / 1e9
    out["share_of_matmul"] = out.gflops_computed / matmul_rate
    for column, name in (("time_s", "time_slope"), ("peak_mem_mb", "memory_slope")):
        slopes = {impl: loglog_slope(rows.n, rows[column]) for impl, rows in out.groupby("impl")}
        out[name] = out.impl.map(slopes)
    return out


def goal_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The issue-13 goals (:data:`GOALS`): measured value, target, pass, and the points they come from."""
    ok = frame[frame.status == "ok"].set_index(["impl", "n"])

    def value(impl: str, n: int, column: str) -> float:
        return float(ok.loc[(impl, n), column]) if (impl, n) in ok.index else float("nan")

    local = {n: value("local_tiled", n, "time_s") for n in (16000, 64000)}
    measured = {
        "speedup_masked_16k": value("sdpa_masked", 16000, "time_s") / local[16000],
        "speedup_fused_64k": value("sdpa_fused", 64000, "time_s") / local[64000],
        "memory_4n": value("local_tiled", 64000, "peak_mem_mb") / value("local_tiled", 16000, "peak_mem_mb"),
        "memory_100k": value("local_tiled", 100_000, "peak_mem_mb"),
        "computed_over_useful": value("local_tiled", 16000, "computed_over_useful"),
    }
    rows = []
    for key, text, target in GOALS:
        got = measured[key]
        higher_better = key.startswith("speedup")
        passed = (got >= target) if higher_better else (got <= target if key != "memory_4n" else got < target)
        rows.append({"goal": text, "target": target, "measured": got,
                     "pass": ("not measured" if math.isnan(got) else ("pass" if passed else "FAIL"))})
    return pd.DataFrame(rows)


def _plot(frame: pd.DataFrame, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from milstudy.plots_rank import scaling_plot

    fig = scaling_plot(frame)
    tmp = out_dir / "local_attention.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(out_dir / "local_attention.png")


def _contention_note(notes: dict) -> str:
    drift = abs(notes["matmul_gflops_end"] / notes["matmul_gflops_start"] - 1)
    load = max(notes["loadavg_start"][0], notes["loadavg_end"][0])
    cores = os.cpu_count() or 1
    verdict = ("timings look contended: " if drift > 0.15 or load > cores + 0.5 else "timings do not look contended: ")
    return (verdict + f"1-min load average {notes['loadavg_start'][0]:.2f} at the start, {notes['loadavg_end'][0]:.2f} "
            f"at the end on {cores} cores (the bench itself uses {notes['threads']} thread); dense matmul "
            f"{notes['matmul_gflops_start']:.1f} GFLOP/s at the start, {notes['matmul_gflops_end']:.1f} at the end "
            f"({100 * drift:.0f} % drift).")


def report(frame: pd.DataFrame, goals: pd.DataFrame, notes: dict) -> str:
    """Markdown placed above the table: machine, contention, goals (pass / FAIL), slopes and speed-ups."""
    import platform

    ok = frame[frame.status == "ok"]
    slopes = ok.groupby("impl")[["time_slope", "memory_slope"]].first().round(2)
    lines = [
        f"# local-attention bench ({'quick' if notes['quick'] else 'full'})", "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {notes['torch']}, "
        f"{notes['threads']} torch thread per point, float32; one head, d = {DIM}, r = {RADIUS:g}, irregular "
        f"foreground filling {100 * FILL:.0f} % of a square grid; forward + backward.", "",
        _contention_note(notes), "",
        "## Goals (issue 13)", "", goals.to_markdown(index=False, floatfmt=".3g"), "",
        "## Log-log slopes (points with N >= 4000)", "", slopes.to_markdown(), "",
        "## Points", "",
    ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False) -> tuple[pd.DataFrame, dict]:
    """The suite (``quick``: N in {500, 1000, 2000}). Returns the per-point frame and, for the runner, the
    Markdown header (machine, contention, goals) and the metadata (matmul rates, load, goals); writes the figure."""
    import torch

    sizes = {impl: QUICK_SIZES if quick else SIZES + (LOCAL_EXTRA if impl == "local_tiled" else ())
             for impl in IMPLEMENTATIONS}
    load_before = os.getloadavg()
    rate_before = dense_matmul_rate()
    frame = measure_grid(sizes)
    rate_after = dense_matmul_rate()
    frame = add_rates(frame, rate_before)
    goals = goal_table(frame)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(frame, out_dir)
    notes = {"quick": quick, "threads": THREADS, "torch": torch.__version__, "dim": DIM, "radius": RADIUS,
             "fill": FILL, "matmul_gflops_start": rate_before, "matmul_gflops_end": rate_after,
             "loadavg_start": list(load_before), "loadavg_end": list(os.getloadavg())}
    notes["contention"] = _contention_note(notes)
    notes["goals"] = goals.to_dict(orient="records")
    frame = frame.round({"time_s": 4, "peak_mem_mb": 1, "computed_over_useful": 3, "gflops_computed": 3,
                         "gflops_useful": 3, "share_of_matmul": 4, "time_slope": 2, "memory_slope": 2})
    return frame, {"markdown": report(frame, goals, notes), "meta": notes}
