"""Benchmark: our zoo models against the peer library torchmil (issue 9, "Speed against the peer library").

Each pair is built at a matched layout (the same widths; torchmil's pooling models get our embedding
``Linear(1024, L) + ReLU`` as their ``feat_ext``, since theirs pool the raw features) and timed on one bag of N
instances (D = 1024, 2 torch threads, CPU): forward + the loss's backward, 7 runs interleaved ours / theirs in one
fresh process per (pair, N), the median of each and their ratio (goal: ratio <= 1.0). "+ instance loss" rows add
CLAM-SB's instance-level loss on both sides (ours through ``targets``, theirs through ``compute_loss``).

torchmil is an optional extra (``pip install -e ".[bench]"``: torchmil 1.0.2, pure Python on top of our torch);
without it every row says skipped. Architectures stay ours: e.g. our TransMIL keeps the kernel-33 depthwise
residual convolution of the authors' code, which torchmil's omits.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd

from milstudy.bench._subprocess import run_case

FEATURE_DIM = 1024
RUNS = 7
# label -> (our zoo name, our kwargs, torchmil class, its kwargs, embedding width given to torchmil or None, with
# the instance loss)
PAIRS = {
    "ABMIL": ("abmil", {"hidden_dim": 500, "attention_dim": 128}, "ABMIL", {"att_dim": 128}, 500, False),
    "gated ABMIL": ("abmil_gated", {"hidden_dim": 500, "attention_dim": 128}, "ABMIL", {"att_dim": 128, "gated": True},
                    500, False),
    "CLAM-SB": ("clam_sb", {"hidden_dim": 512, "attention_dim": 256, "k_sample": 8, "dropout": 0.0}, "CLAM_SB",
                {"att_dim": 256, "gated": True, "k_sample": 8}, 512, False),
    "CLAM-SB + instance loss": ("clam_sb", {"hidden_dim": 512, "attention_dim": 256, "k_sample": 8, "dropout": 0.0},
                                "CLAM_SB", {"att_dim": 256, "gated": True, "k_sample": 8}, 512, True),
    "DSMIL": ("dsmil", {"query_dim": 128}, "DSMIL", {"att_dim": 128, "nonlinear_q": True}, None, False),
    "TransMIL": ("transmil", {"dim": 512, "heads": 8, "landmarks": 256, "dropout": 0.0}, "TransMIL",
                 {"att_dim": 512, "n_layers": 2, "n_heads": 8, "n_landmarks": 256, "dropout": 0.0}, None, False),
}


def torchmil_version() -> str | None:
    """The installed torchmil version, or None."""
    from importlib import metadata

    try:
        return metadata.version("torchmil")
    except metadata.PackageNotFoundError:
        return None


def measure_pair(label: str, n_instances: int, threads: int = 2) -> dict:
    """Median forward+backward seconds of ours and torchmil's ``label`` on a ``[1, n_instances, 1024]`` bag, 7 runs
    interleaved (after two warm-up runs each), in this process."""
    import torch
    import torchmil.models as peer
    from torch import nn

    from milstudy.models import build_model

    ours_name, ours_kwargs, peer_name, peer_kwargs, embed, instance_loss = PAIRS[label]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = build_model(ours_name, FEATURE_DIM, 1 if ours_name == "dsmil" else 2, **ours_kwargs)
    feat_ext = nn.Sequential(nn.Linear(FEATURE_DIM, embed), nn.ReLU()) if embed else nn.Identity()
    theirs = getattr(peer, peer_name)(in_shape=(FEATURE_DIM,), **peer_kwargs,
                                      **({"feat_ext": feat_ext} if embed else {}))
    x = torch.randn(1, n_instances, FEATURE_DIM)
    label_tensor = torch.tensor([1])
    targets = {"targets": label_tensor} if instance_loss else {}  # without targets no instance branch runs

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        out = ours(x, **targets)
        loss = out.logits.sum() + (sum(out.aux_losses.values()) if instance_loss and out.aux_losses else 0)
        loss.backward()

    def step_theirs() -> None:
        theirs.zero_grad(set_to_none=True)
        if instance_loss:
            _, losses = theirs.compute_loss(label_tensor.float(), x)
            sum(losses.values()).backward()
            return
        out = theirs(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    for step in (step_ours, step_theirs, step_ours, step_theirs):
        step()
    times: dict[str, list[float]] = {"ours": [], "torchmil": []}
    for _ in range(RUNS):
        for side, step in (("ours", step_ours), ("torchmil", step_theirs)):
            start = time.perf_counter()
            step()
            times[side].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["torchmil"])
    return {"ours_s": ours_s, "torchmil_s": theirs_s, "ratio": ours_s / theirs_s,
            "ours_range_s": f"{min(times['ours']):.3f}-{max(times['ours']):.3f}",
            "torchmil_range_s": f"{min(times['torchmil']):.3f}-{max(times['torchmil']):.3f}"}


def run(out_dir: Path, quick: bool = False) -> tuple[pd.DataFrame, dict]:
    """Every pair of :data:`PAIRS` at N in {1k, 10k} (quick: {500}); one row per (pair, N)."""
    from tqdm import tqdm

    version = torchmil_version()
    sizes = [500] if quick else [1000, 10_000]
    rows = []
    for label in tqdm(PAIRS, desc="peer bench"):
        for n in sizes:
            row = {"model": label, "n_instances": n, "feature_dim": FEATURE_DIM}
            if version is None:
                row["status"] = 'skipped: torchmil is not installed (pip install -e ".[bench]")'
            else:
                row.update(run_case("milstudy.bench.peer", "measure_pair", label, n, timeout=600))
            rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("ours_s", "torchmil_s", "ratio", "ours_range_s", "torchmil_range_s"):
        if column not in frame:
            frame[column] = None
    frame = frame[["model", "n_instances", "feature_dim", "ours_s", "torchmil_s", "ratio", "ours_range_s",
                   "torchmil_range_s", "status"]].round({"ours_s": 3, "torchmil_s": 3, "ratio": 2})
    header = (f"Ours vs torchmil {version or '(not installed)'} at matched layouts: forward+backward of one bag, "
              f"D = {FEATURE_DIM}, 2 torch threads, median of {RUNS} interleaved runs per side (ranges beside); "
              "ratio = ours / torchmil (goal <= 1.0).")
    return frame, {"markdown": header, "meta": {"torchmil": version}}
