"""``milstudy calibrate``: calibrate the S-vec worlds (:mod:`milstudy.papers.svec`) and, with ``--freeze``, write the
chosen knobs to ``milstudy/resources/svec_knobs.json``.

``milstudy calibrate --tasks detection subtyping --seeds 0 1 2 --out results/calibration`` (knob and values per
task from ``CALIBRATION_GRID``, or ``--knob`` / ``--values`` for every task)
writes ``calibration.csv`` (one row per run), ``calibration_summary.csv`` / ``.md`` (seed mean and sd per value,
the target band, in band or not) and ``run.json`` into ``--out``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from milstudy.console import add_logging_flags

log = logging.getLogger("milstudy.calibrate")


def _cmd_calibrate(args) -> int:
    import pandas as pd

    from milstudy.papers import svec
    from milstudy.provenance import atomic_write, environment_info, now_iso, write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, started = time.perf_counter(), now_iso()
    environment = environment_info()  # at the start: the code that runs is the code checked out now
    tables = [svec.calibrate(task, args.values, knob=args.knob, train_seeds=args.seeds, progress=not args.quiet)
              for task in args.tasks]
    table = pd.concat(tables, ignore_index=True)
    summary = svec.summarize_calibration(table)
    chosen = svec.choose(summary)
    for name, frame in (("calibration.csv", table), ("calibration_summary.csv", summary)):
        atomic_write(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    markdown = summary.round(4).to_markdown(index=False) + "\n"
    atomic_write(out / "calibration_summary.md", lambda tmp: Path(tmp).write_text(markdown))
    grid = {task: {"knob": str(part["knob"].iloc[0]), "values": sorted(part["value"].unique().tolist())}
            for task, part in table.groupby("task")}
    record = {"command": "calibrate", "tasks": args.tasks, "grid": grid,
              "seeds": args.seeds, "calibration_seed": svec.CALIBRATION_SEED, "chosen": chosen,
              "frozen": bool(args.freeze), "started": started, "finished": now_iso(),
              "wall_time_s": round(time.perf_counter() - start, 1), **environment}
    write_json_atomic(out / "run.json", record)
    for task, value in chosen.items():
        if value is None:
            log.warning("%s: no %s value puts mean pooling in the target band; nothing frozen for it", task,
                        grid[task]["knob"])
        else:
            log.info("%s: %s = %s (mean pooling in the band)", task, grid[task]["knob"], value)
    if args.freeze:
        svec.freeze(summary, chosen)
        log.info("frozen knobs written to %s", svec.KNOBS_FILE)
    return 0 if all(v is not None for v in chosen.values()) else 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate the S-vec synthetic worlds against mean pooling")
    p.add_argument("--tasks", nargs="+", default=["detection", "subtyping", "grading", "survival"],
                   choices=("detection", "subtyping", "grading", "survival"))
    p.add_argument("--knob", default=None, help="the DescriptorWorld field varied (default: per task, "
                   "milstudy.papers.svec.CALIBRATION_GRID)")
    p.add_argument("--values", nargs="+", type=float, default=None, help="knob values (default: per task)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds per value")
    p.add_argument("--out", default="results/calibration", help="folder for the tables and run.json")
    p.add_argument("--freeze", action="store_true", help="write the chosen knobs to milstudy/resources/svec_knobs.json")
    add_logging_flags(p, "debug messages")
    p.set_defaults(func=_cmd_calibrate)
