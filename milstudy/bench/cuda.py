"""The GPU check (issues 9 and 13): one prepared command for a machine with CUDA, ``milstudy bench cuda``.

CI and the development machine have no GPU, so the CUDA paths are checked here, in one run (a few minutes):

- ``kernels``: the 2-D local and full-ALiBi attention on CUDA in float32, each backend (``torch``: the tiled /
  chunked kernels; ``flex``: FlexAttention, compiled), forward and backward, against the dense oracle in float64
  on an irregular, shuffled, padded foreground (pass: max abs error <= ``TOLERANCE``);
- ``longmil``: LongMIL's logits and parameter gradients with ``attention_backend="flex"`` against ``"torch"``;
- ``e2e_amp``: two epochs of E2E training (``tiny_cnn`` + ABMIL on the toy cohort) with AMP and channels_last
  against fp32 on the same seed: finite losses, and the loss difference AMP makes;
- ``timing``: forward + backward of one head, d = 64, r = 10 on a 70 % foreground (as ``milstudy bench
  local-attention`` on CPU): the tiled kernel, FlexAttention, SDPA with the dense boolean mask, and fused SDPA
  without a mask (full attention), median of ``REPEATS`` after a warm-up (compilation excluded), CUDA-synchronised,
  with the peak of ``torch.cuda.max_memory_allocated``.

Every section runs on its own: one that fails is recorded with its error and the others still run. On a machine
without CUDA the topic is skipped by ``milstudy bench --all`` and refused when named.
"""

from __future__ import annotations

import statistics
import time
import traceback
from pathlib import Path

import pandas as pd

REQUIRES_CUDA = True
TOLERANCE = 1e-4
REPEATS = 5
SIZES, QUICK_SIZES = (16_000, 64_000), (4_000,)
MASKED_MAX_N = 16_000  # the dense N x N boolean mask: 4 GB at 64k
BACKENDS = ("torch", "flex")


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _foreground(n: int, batch: int = 2, seed: int = 0):
    import torch

    from milstudy.data.synthetic.foreground import irregular_foreground

    coords = torch.stack([torch.as_tensor(irregular_foreground(n, fill=0.7, seed=seed + b)) for b in range(batch)])
    order = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(seed + b)) for b in range(batch)])
    coords = coords.gather(1, order[:, :, None].expand(batch, n, 2))  # tokens in no particular order
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, -n // 5:] = False  # the last bag is shorter: a padded tail
    return coords, mask


def kernel_rows(n: int = 1500, heads: int = 2, d: int = 32, device: str = "cuda", backends=BACKENDS) -> list[dict]:
    import torch

    from milstudy.models.local_attention import dense_local_attention_2d, full_attention_2d_alibi, local_attention_2d

    coords, mask = _foreground(n)
    coords, mask = coords.to(device), mask.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, cot = (torch.randn(2, heads, n, d, generator=gen, device=device, dtype=torch.float64) for _ in range(4))
    slopes = torch.tensor([0.25, 2 ** -6], dtype=torch.float64, device=device)[:heads]
    rows = []
    for layer, radius in (("local", 10.0), ("full", None)):
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        out_ref = dense_local_attention_2d(*ref, coords, radius, slopes, mask)
        (out_ref * cot).sum().backward()
        for backend in backends:
            ins = [t.float().requires_grad_() for t in (q, k, v)]
            start = time.perf_counter()
            if layer == "local":
                out = local_attention_2d(*ins, coords, radius, slopes.float(), mask, backend=backend)
            else:
                out = full_attention_2d_alibi(*ins, coords, slopes.float(), mask, backend=backend)
            (out * cot.float()).sum().backward()
            _sync(device)
            errors = [float((a.detach().double() - b.detach()).abs().max()) for a, b in
                      zip([out] + [t.grad for t in ins], [out_ref] + [t.grad for t in ref])]
            rows.append({"section": "kernels", "name": f"{layer} attention, backend={backend}", "n": n,
                         "max_abs_error": max(errors), "error_out": errors[0], "error_grads": max(errors[1:]),
                         "pass": max(errors) <= TOLERANCE, "seconds": time.perf_counter() - start,
                         "note": "first call (flex: compilation included)"})
    return rows


def longmil_rows(n: int = 3000, device: str = "cuda") -> list[dict]:
    import torch

    from milstudy.models import build_model

    torch.manual_seed(0)
    coords, mask = _foreground(n)
    coords, mask = coords.to(device).double(), mask.to(device)
    x = torch.randn(2, n, 64, device=device)
    models = {b: build_model("longmil", in_dim=64, n_out=2, dim=128, attention_backend=b).to(device)
              for b in BACKENDS}
    models["flex"].load_state_dict(models["torch"].state_dict())
    results = {}
    for backend, model in models.items():
        model(x, coords=coords, mask=mask).logits.sum().backward()  # warm-up (flex: compilation)
        _sync(device)
        start = time.perf_counter()
        for _ in range(3):
            model.zero_grad()
            logits = model(x, coords=coords, mask=mask).logits
            logits.sum().backward()
        _sync(device)
        results[backend] = (logits.detach(), [p.grad.clone() for p in model.parameters()], (time.perf_counter() - start) / 3)
    grad_error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                     for a, b in zip(results["flex"][1], results["torch"][1]))
    logit_error = float((results["flex"][0] - results["torch"][0]).abs().max())
    return [{"section": "longmil", "name": "LongMIL flex vs torch backend", "n": n, "max_abs_error": logit_error,
             "error_grads": grad_error, "pass": logit_error <= 1e-3 and grad_error <= 1e-3,
             "seconds": results["flex"][2], "note": f"torch backend {results['torch'][2]:.4f} s per fwd+bwd; grads: "
                                                   "max relative error per parameter"}]


def e2e_amp_rows(device: str = "cuda") -> list[dict]:
    import numpy as np

    from milstudy.data.e2e_slides import toy_slides
    from milstudy.train.e2e import E2EConfig, train_e2e
    from milstudy.train.tasks import ClassificationTask

    slides = toy_slides(8, n_patches=96, size=32, n_low=32)
    losses, rows = {}, []
    for amp in (True, False):
        config = E2EConfig(encoder="tiny_cnn", aggregator="abmil", s=64, epochs=2, batch_slides=2, warmup_epochs=0,
                           device=device, amp=amp, channels_last=amp, seed=0)
        result = train_e2e({"train": slides}, ClassificationTask(2), config)
        losses[amp] = result.history["train_loss"].to_numpy()
        rows.append({"section": "e2e_amp", "name": f"E2E tiny_cnn + ABMIL, amp={amp}, channels_last={amp}",
                     "pass": bool(np.all(np.isfinite(losses[amp]))), "seconds": result.wall_time,
                     "note": "train loss per epoch " + ", ".join(f"{x:.4f}" for x in losses[amp])})
    rows[0]["max_abs_error"] = float(np.abs(losses[True] - losses[False]).max())  # what AMP changes, not a bound
    return rows


def _timed(step) -> tuple[float, float]:
    import torch

    step()  # warm-up (compilation for flex)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(REPEATS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def timing_rows(sizes) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from milstudy.bench.local_attention import DIM, RADIUS
    from milstudy.models.local_attention import local_attention_2d

    rows = []
    for n in sizes:
        coords = _foreground(n, batch=1)[0].cuda()
        q, k, v = (torch.randn(1, 1, n, DIM, device="cuda", requires_grad=True) for _ in range(3))
        impls = {"local_torch": lambda: local_attention_2d(q, k, v, coords, RADIUS),
                 "local_flex": lambda: local_attention_2d(q, k, v, coords, RADIUS, backend="flex"),
                 "sdpa_fused": lambda: F.scaled_dot_product_attention(q, k, v)}
        if n <= MASKED_MAX_N:
            def masked():
                diff = coords[0][:, None, :] - coords[0][None, :, :]
                return F.scaled_dot_product_attention(q, k, v, attn_mask=(diff * diff).sum(-1) <= int(RADIUS ** 2))
            impls["sdpa_masked"] = masked
        for name, attend in impls.items():
            def step():
                for t in (q, k, v):
                    t.grad = None
                attend().sum().backward()
            row = {"section": "timing", "name": name, "n": n}
            try:
                row["seconds"], row["peak_mem_mb"] = _timed(step)
            except Exception as error:  # noqa: BLE001 - recorded, the other points still run
                row["note"] = f"failed: {type(error).__name__}: {error}"[:300]
            rows.append(row)
    base = {r["n"]: r.get("seconds") for r in rows if r["name"] == "local_torch"}
    for row in rows:
        if row.get("seconds") and base.get(row["n"]):
            row["speed_vs_local_torch"] = base[row["n"]] / row["seconds"]
    return rows


def run(out_dir: Path, quick: bool = False) -> tuple[pd.DataFrame, dict]:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("milstudy bench cuda needs a CUDA device (torch.cuda.is_available() is False)")
    sections = {"kernels": kernel_rows, "longmil": longmil_rows, "e2e_amp": e2e_amp_rows,
                "timing": lambda: timing_rows(QUICK_SIZES if quick else SIZES)}
    rows = []
    for name, section in sections.items():
        try:
            rows.extend(section())
        except Exception as error:  # noqa: BLE001 - one broken path must not hide the others
            rows.append({"section": name, "name": "section failed", "pass": False,
                         "note": "".join(traceback.format_exception_only(error)).strip()[:500]})
    frame = pd.DataFrame(rows)
    checks = frame[frame["pass"].notna()] if "pass" in frame else frame.iloc[:0]
    device = torch.cuda.get_device_name()
    header = (f"# GPU check ({'quick' if quick else 'full'})\n\nDevice: {device}, torch {torch.__version__}; "
              f"{int(checks['pass'].astype(bool).sum())} of {len(checks)} checks pass (tolerance {TOLERANCE} for the "
              "kernels against the float64 oracle).\n")
    return frame, {"markdown": header, "meta": {"cuda_device": device}}
