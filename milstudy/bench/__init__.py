"""``milstudy bench``: speed and memory goals, measured, never asserted in timed tests.

Every module ``milstudy/bench/<topic>.py`` defines ``run(out_dir: Path, quick: bool) -> pandas.DataFrame``
(or ``(frame, extras)`` with ``extras = {"markdown": header text, "meta": dict}``); the runner saves the frame as
``results/benchmarks/<topic>.csv`` (+ Markdown, after the header) with a ``<topic>.json`` provenance record
(machine, versions, date, plus ``meta``). ``quick`` shrinks sizes for a fast sanity run. A module with
``REQUIRES_CUDA = True`` (``cuda``: the GPU check) is left out of ``--all`` on a machine without CUDA and refused
there when named.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import time
from pathlib import Path

from milstudy.paths import results_root


def available() -> list[str]:
    import milstudy.bench as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def machine_info() -> dict:
    import os

    import torch

    from milstudy.provenance import cpu_model

    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_benchmark(topic: str, out_dir: Path, quick: bool = False) -> Path:
    module = importlib.import_module(f"milstudy.bench.{topic}")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    frame = module.run(out_dir=out_dir, quick=quick)
    frame, extras = frame if isinstance(frame, tuple) else (frame, {})
    wall = time.perf_counter() - start
    csv_path = out_dir / f"{topic}.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(csv_path)
    header = extras.get("markdown", "")
    (out_dir / f"{topic}.md").write_text((header + "\n" if header else "") + frame.to_markdown(index=False) + "\n")
    meta = {"topic": topic, "quick": quick, "wall_s": round(wall, 2), **machine_info(), **extras.get("meta", {})}
    (out_dir / f"{topic}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return csv_path


def requires_cuda(topic: str) -> bool:
    return bool(getattr(importlib.import_module(f"milstudy.bench.{topic}"), "REQUIRES_CUDA", False))


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    named = not (args.all or not args.topics)
    topics = [t.replace("-", "_") for t in args.topics] if named else available()
    unknown = sorted(set(topics) - set(available()))
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    if not torch.cuda.is_available():
        gpu_only = [t for t in topics if requires_cuda(t)]
        if named and gpu_only:
            print(f"error: benchmark(s) {', '.join(gpu_only)} need a CUDA device; this machine has none")
            return 2
        for topic in gpu_only:
            print(f"{topic}: skipped (needs a CUDA device)")
        topics = [t for t in topics if t not in gpu_only]
    out_dir = Path(args.out) if args.out else results_root() / "benchmarks"
    for topic in topics:
        path = run_benchmark(topic, out_dir, quick=args.quick)
        print(f"{topic}: wrote {path}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run speed/memory benchmarks into results/benchmarks/")
    p.add_argument("topics", nargs="*", help="benchmark topics, e.g. models, local-attention (default: all)")
    p.add_argument("--all", action="store_true", help="run every benchmark")
    p.add_argument("--quick", action="store_true", help="small sizes, for a sanity run")
    p.add_argument("--out", help="output folder (default results/benchmarks)")
    p.set_defaults(func=_cmd_bench)
