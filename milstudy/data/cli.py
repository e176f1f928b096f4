"""``milstudy data``: build synthetic cohorts, tile slides into patch grids, check a manifest's slides.

* ``milstudy data synth --profile cpu --task detection --seed 0 [--out DIR]``
* ``milstudy data tile (--slides FILE|DIR ... | --manifest M --slide-root R) --mpp 2.0 --patch-size 32
  [--multiscale] [--min-tissue 0.5] --out DIR``: one HDF5 grid per slide (``coords``, ``tissue_fraction``, and
  ``tumour_fraction`` / ``instance_labels`` when a ground-truth mask is known; ``low/`` with ``--multiscale``)
  plus ``tiling_summary.csv`` (per-slide counts, empty slides, unreadable slides).
* ``milstudy data check --manifest M --slide-root R``: lists missing / unreadable slides, exit 1 if any.
* ``milstudy data masks --manifest M --slide-root R --annotations DIR --out DIR [--downsample 32]``: lesion
  annotations (ASAP XML, ``<slide_id>.xml``) -> tumour masks ``<out>/<slide_id>.png`` and ``<out>/manifest.csv``
  (the input manifest + ``mask_path``, ``mask_downsample``), which ``data tile`` and ``features extract`` turn into
  instance labels. Slides without an annotation file get an empty mask (every patch negative, as CAMELYON's
  normal slides) unless ``--missing skip``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from milstudy.console import add_logging_flags, progress_disabled, report_slide_statuses
from milstudy.provenance import atomic_write

log = logging.getLogger("milstudy.data")

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def _cmd_synth(args: argparse.Namespace) -> int:
    from milstudy.data.synthetic import PROFILES, SyntheticCohortConfig, build_cohort

    if args.profile not in PROFILES:
        print(f"error: no synthetic cohort for profile {args.profile!r}; choose {sorted(PROFILES)}", file=sys.stderr)
        return 2
    config = SyntheticCohortConfig(task=args.task, seed=args.seed, **PROFILES[args.profile])
    cohort = build_cohort(config, root=args.out, n_workers=args.workers)
    m = cohort.manifest
    print(f"cohort: {cohort.root}")
    print(f"manifest: {cohort.manifest_path} ({len(m)} slides; label counts {m['label'].value_counts().sort_index().to_dict()})")
    return 0


def _collect_slides(args: argparse.Namespace, out: Path):
    """[(slide_id, path, mask_path or None, mask_downsample or None, mpp or None, output path)] from --slides or
    --manifest; output paths are checked to stay inside ``out`` and not to collide (``OutputPathError``)."""
    import pandas as pd

    from milstudy.data.manifests import manifest_lines, output_paths, row_mpp

    items, lines, source = [], None, "--slides"
    if args.manifest:
        from milstudy.data.manifests import load_manifest, resolve_paths

        frame = resolve_paths(load_manifest(args.manifest, require=("slide_id", "path")), args.slide_root,
                              allow_outside_root=args.allow_outside_root, source=args.manifest)
        lines, source = manifest_lines(frame, args.manifest), args.manifest
        root = Path(args.slide_root) if args.slide_root else Path(args.manifest).resolve().parent
        for _, row in frame.iterrows():
            mask = row.get("mask_path") if "mask_path" in frame.columns else None
            if isinstance(mask, str) and mask and not Path(mask).is_absolute():
                mask = str(root / mask)
            ds = row.get("mask_downsample") if "mask_downsample" in frame.columns else None
            items.append((str(row["slide_id"]), str(row["path"]), mask if isinstance(mask, str) and mask else None,
                          float(ds) if ds is not None and not pd.isna(ds) else None, row_mpp(row, args.slide_mpp)))
    for entry in args.slides or []:
        path = Path(entry)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES) if path.is_dir() else [path]
        items.extend((p.stem, str(p), None, None, args.slide_mpp) for p in files)
    targets = output_paths([it[0] for it in items], out, ".h5", source, lines if not args.slides else None)
    return [(*item, target) for item, target in zip(items, targets)]


def _cmd_tile(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from milstudy.data.manifests import open_manifest_slide
    from milstudy.data.slides import SlideError
    from milstudy.data.synthetic import instance_labels
    from milstudy.data.tiling import multiscale_grid, save_grid, tile_slide
    from milstudy.data.tissue import segment_tissue
    from milstudy.features import describe_error

    if not args.slides and not args.manifest:
        print("error: pass --slides FILE|DIR ... or --manifest M [--slide-root R]", file=sys.stderr)
        return 2
    out = Path(args.out)
    items = _collect_slides(args, out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    log.info("tiling %d slide(s) at %g µm/px, %d px patches -> %s", len(items), args.mpp, args.patch_size, out)
    for slide_id, path, mask_path, mask_ds, mpp, target in tqdm(items, desc="tiling", unit="slide",
                                                                 disable=progress_disabled(args)):
        record = {"slide_id": slide_id, "path": path, "status": "ok", "n_patches": 0, "n_low": None,
                  "n_tumour": None, "message": ""}
        try:
            slide = open_manifest_slide(path, mpp)
            mask = segment_tissue(slide)
            if args.multiscale:
                ms = multiscale_grid(slide, args.mpp, args.patch_size, args.low_factor, args.min_tissue, mask, slide_id=slide_id)
                grid, low = ms.main, ms.low
                record["n_low"] = len(low)
            else:
                grid, low = tile_slide(slide, args.mpp, args.patch_size, args.step, args.min_tissue, mask, slide_id=slide_id), None
            datasets = {}
            if mask_path:
                fraction, labels = instance_labels(mask_path, grid.coords, grid.size_level0, mask_ds or 8.0)
                datasets = {"tumour_fraction": fraction, "instance_labels": labels}
                record["n_tumour"] = int(labels.sum())
            if args.multiscale:
                datasets["main_to_low"] = ms.main_to_low
            save_grid(target, grid, datasets, low=low)
            record["n_patches"] = len(grid)
            if grid.is_empty:
                record["status"], record["message"] = "empty", "no tissue patches at these settings"
        except (SlideError, FileNotFoundError) as err:
            record["status"], record["message"] = "unreadable", str(err)
        except Exception as err:  # noqa: BLE001 - MemoryError, a full disk...: record it, go on, write the summary
            record["status"], record["message"] = "error", describe_error(err)
        log.debug("%s: %s, %d patches%s", slide_id, record["status"], record["n_patches"],
                  f" ({record['message']})" if record["message"] else "")
        records.append(record)
    summary = pd.DataFrame.from_records(records, columns=["slide_id", "path", "status", "n_patches", "n_low",
                                                          "n_tumour", "message"])
    atomic_write(out / "tiling_summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    headline = (f"tiled {int((summary['status'] == 'ok').sum())}/{len(summary)} slides, "
                f"{int(summary['n_patches'].sum())} patches -> {out}")
    return report_slide_statuses(summary, headline, failing=("unreadable", "error"))


def _cmd_check(args: argparse.Namespace) -> int:
    from milstudy.data.manifests import check_slides

    log.info("checking the slides of %s", args.manifest)
    report = check_slides(args.manifest, args.slide_root, progress=not progress_disabled(args),
                          slide_mpp=args.slide_mpp, allow_outside_root=args.allow_outside_root)
    for _, row in report.iterrows():
        log.debug("%s: %s%s", row["slide_id"], row["status"], f" ({row['message']})" if row["message"] else "")
    n_ok = int((report["status"] == "ok").sum())
    code = report_slide_statuses(report, f"{n_ok}/{len(report)} slides ok")
    notes = report[(report["status"] == "ok") & (report["message"] != "")]
    for _, row in notes.iterrows():
        print(f"  note: {row['slide_id']} ({row['path']}): {row['message']}")
    return code


def _cmd_masks(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from milstudy.data.annotations import TUMOUR_LABEL, write_annotation_mask
    from milstudy.data.manifests import (load_manifest, manifest_lines, open_manifest_slide, output_paths,
                                         resolve_paths, row_mpp)
    from milstudy.data.slides import SlideError
    from milstudy.features import describe_error

    frame = resolve_paths(load_manifest(args.manifest, require=("slide_id", "path")), args.slide_root,
                          allow_outside_root=args.allow_outside_root, source=args.manifest)
    annotations, out = Path(args.annotations), Path(args.out)
    if not annotations.is_dir():
        print(f"error: --annotations {annotations} is not a folder of <slide_id>.xml files", file=sys.stderr)
        return 2
    targets = output_paths([str(s) for s in frame["slide_id"]], out, ".png", args.manifest,
                           manifest_lines(frame, args.manifest))  # refuses ids that leave --out or collide
    out.mkdir(parents=True, exist_ok=True)
    records, mask_paths = [], []
    log.info("%d slide(s), annotations from %s -> %s", len(frame), annotations, out)
    rows = tqdm(zip(frame.iterrows(), targets), total=len(frame), desc="masks", unit="slide",
                disable=progress_disabled(args))
    for (_, row), target in rows:
        slide_id, xml = str(row["slide_id"]), annotations / f"{row['slide_id']}.xml"
        record = {"slide_id": slide_id, "path": str(row["path"]), "status": "ok", "tumour_px": 0, "message": ""}
        try:
            if not xml.is_file() and args.missing == "skip":
                record["status"], record["message"] = "no annotation", "skipped (no mask_path)"
                target = None
            else:
                dimensions = open_manifest_slide(row["path"], row_mpp(row, args.slide_mpp)).dimensions
                source = xml if xml.is_file() else None
                target, record["tumour_px"] = write_annotation_mask(source, dimensions, target, args.downsample)
                if source is None:
                    record["message"] = "no annotation: empty mask"
                if xml.is_file() and record["tumour_px"] == 0:
                    record["status"], record["message"] = "empty", f"{xml.name} has no tumour area inside the slide"
        except (SlideError, FileNotFoundError, ValueError) as err:
            record["status"], record["message"], target = "error", str(err), None
        except Exception as err:  # noqa: BLE001 - MemoryError, a full disk...: record it, go on, write the summary
            record["status"], record["message"], target = "error", describe_error(err), None
        log.debug("%s: %s, %d tumour px%s", slide_id, record["status"], record["tumour_px"],
                  f" ({record['message']})" if record["message"] else "")
        records.append(record)
        mask_paths.append(str(target.resolve()) if target is not None else "")
    frame = load_manifest(args.manifest, require=("slide_id", "path")).assign(
        mask_path=mask_paths, mask_downsample=float(args.downsample))
    atomic_write(out / "manifest.csv", lambda tmp: frame.to_csv(tmp, index=False))
    summary = pd.DataFrame.from_records(records)
    annotated = int((summary["tumour_px"] > 0).sum())
    headline = (f"{annotated}/{len(summary)} slides with tumour annotations (label {TUMOUR_LABEL} in the masks) "
                f"-> {out}/manifest.csv")
    return report_slide_statuses(summary, headline, failing=("error",))


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="synthetic cohorts, tiling, slide checks")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    p = sub.add_parser("synth", help="build (or reuse) a synthetic cohort")
    p.add_argument("--profile", default="cpu", help="smoke | cpu (default cpu)")
    p.add_argument("--task", default="detection", choices=("detection", "subtyping", "grading", "survival"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="cohort folder (default cache_root()/cohorts/<task>-<hash>)")
    p.add_argument("--workers", type=int, default=None, help="processes (default 2 for large cohorts)")
    add_logging_flags(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("tile", help="tile slides into HDF5 patch grids (+ instance labels when masks are known)")
    p.add_argument("--slides", nargs="+", help="slide files or folders")
    p.add_argument("--manifest", help="manifest CSV (paths relative to --slide-root)")
    p.add_argument("--slide-root", default=None)
    p.add_argument("--mpp", type=float, default=2.0, help="target µm/px of the patches (default 2.0)")
    p.add_argument("--patch-size", type=int, default=32, help="patch size in output px (default 32)")
    p.add_argument("--step", type=int, default=None, help="grid step in output px (default: patch size)")
    p.add_argument("--multiscale", action="store_true", help="also a low-magnification grid (MRIS)")
    p.add_argument("--low-factor", type=int, default=2)
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--slide-mpp", type=float, default=None, help="µm/px of level 0 for slides without metadata")
    p.add_argument("--out", required=True, help="output folder for <slide_id>.h5 + tiling_summary.csv")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept manifest paths that climb out of --slide-root with '..'")
    add_logging_flags(p)
    p.set_defaults(func=_cmd_tile)

    p = sub.add_parser("check", help="list missing / unreadable slides of a manifest (exit 1 if any)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--slide-root", default=None)
    p.add_argument("--slide-mpp", type=float, default=None, help="µm/px of level 0 for slides without metadata")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept manifest paths that climb out of --slide-root with '..'")
    add_logging_flags(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("masks", help="lesion annotations (ASAP / CAMELYON XML) -> tumour masks + manifest")
    p.add_argument("--manifest", required=True)
    p.add_argument("--slide-root", default=None)
    p.add_argument("--annotations", required=True, help="folder of <slide_id>.xml (ASAP format)")
    p.add_argument("--out", required=True, help="output folder for <slide_id>.png + manifest.csv")
    p.add_argument("--downsample", type=float, default=32.0, help="level-0 px per mask px (default 32)")
    p.add_argument("--missing", choices=("empty", "skip"), default="empty",
                   help="slides without an annotation file: empty mask (default) or no mask")
    p.add_argument("--slide-mpp", type=float, default=None, help="µm/px of level 0 for slides without metadata")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept manifest paths that climb out of --slide-root with '..'")
    add_logging_flags(p)
    p.set_defaults(func=_cmd_masks)

    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
