"""Two-stage feature extraction: slides -> tissue patches -> frozen encoder -> one HDF5 bag per slide.

``extract_features`` (and ``milstudy features extract``) tiles every slide of a manifest at a physical resolution
(``milstudy.data.tiling.tile_slide``), reads patches in DataLoader workers (``milstudy.data.patches.PatchDataset``),
embeds them with ``milstudy.encoders.build_encoder`` (AMP on CUDA) and writes ``<out>/<slide_id>.h5`` with
``features`` float32 [N, D], ``coords`` int64 [N, 2] (level-0 x, y; the CLAM/TRIDENT layout, so
``milstudy.data.bags.BagDataset`` reads these and theirs alike), optional ``instance_labels`` / ``tumour_fraction``
(manifests with ``mask_path``) and attributes (encoder, weight_hash, target_mpp, patch_size, level, n_patches, ...).

Resumable: an existing file is verified (opens, ``features`` has ``n_patches`` rows of the encoder's width) and
skipped only when its recorded ``settings`` (encoder, weight hash, resolution, patch size, min_tissue, precision,
slide and mask file fingerprints) equal this run's; anything else is redone, saying which setting differed. Files are written to a
temporary name and renamed, so a killed job never leaves a half-written bag. ``shard="i/n"`` processes manifest rows
i, i+n, i+2n, ... (array jobs). Slides without tissue get an empty bag (BagDataset skips it) and every slide's
outcome goes to ``extraction_summary*.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from milstudy.console import add_logging_flags, progress_disabled, report_slide_statuses
from milstudy.provenance import atomic_write

log = logging.getLogger("milstudy.features")

SUMMARY_COLUMNS = ["slide_id", "status", "n_patches", "n_failed", "seconds", "message"]


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None stays None."""
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            index, count = (int(part) for part in shard.split("/"))
        except ValueError as err:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from err
    else:
        index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    return index, count


def _expected_attrs(encoder, target_mpp: float, patch_size: int) -> dict:
    return {"encoder": encoder.name, "weight_hash": encoder.weight_hash, "target_mpp": float(target_mpp),
            "patch_size": int(patch_size)}


def _file_fingerprint(path: str | os.PathLike | None, whole: bool = False) -> str:
    """sha1 of a file: whole (masks, small) or size + first and last 64 KiB (slides, large); "" if absent."""
    import hashlib

    if path is None or (isinstance(path, float) and np.isnan(path)) or not str(path):
        return ""
    path = Path(str(path))
    try:
        size = path.stat().st_size
        h = hashlib.sha1(str(size).encode())
        with open(path, "rb") as handle:
            if whole:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(handle.read(1 << 16))
                if size > 1 << 16:
                    handle.seek(max(size - (1 << 16), 1 << 16))
                    h.update(handle.read())
    except OSError:
        return "unreadable"
    return h.hexdigest()[:16]


def slide_settings(row: pd.Series, root: Path | None, expected: dict, min_tissue: float, slide_mpp: float | None,
                   precision: str) -> dict:
    """Everything that changes one slide's bag: the resume key (stored as JSON in the bag's ``settings``)."""
    mask = row.get("mask_path")
    mask = None if mask is None or pd.isna(mask) or not str(mask) else Path(str(mask))
    if mask is not None and not mask.is_absolute() and root is not None:
        mask = root / mask
    downsample = row.get("mask_downsample")
    return {**expected, "min_tissue": float(min_tissue), "slide_mpp_override": slide_mpp, "precision": precision,
            "slide_file": _file_fingerprint(row["path"]), "mask_file": _file_fingerprint(mask, whole=True),
            "mask_downsample": None if downsample is None or pd.isna(downsample) else float(downsample),
            "format": 2}


def settings_difference(path: Path, settings: dict) -> list[str] | None:
    """None if the bag at ``path`` was made with ``settings``; else ``["min_tissue 0.5 -> 0.2", ...]``
    (``["no recorded settings"]`` for bags of older versions or other tools)."""
    import json

    import h5py

    try:
        with h5py.File(path, "r") as handle:
            stored = handle.attrs.get("settings")
    except OSError:
        return ["unreadable file"]
    if stored is None:
        return ["no recorded settings"]
    try:
        stored = json.loads(stored)
    except (TypeError, ValueError):
        return ["unreadable settings"]
    fresh = json.loads(json.dumps(settings))
    changed = [f"{k} {stored.get(k)!r} -> {fresh.get(k)!r}" for k in sorted(set(stored) | set(fresh))
               if stored.get(k) != fresh.get(k)]
    return changed or None


def bag_difference(path: Path, expected: dict, feature_dim: int) -> list[str] | None:
    """None if ``path`` is a finished bag matching ``expected`` attributes (encoder, weights hash, resolution,
    patch size) and ``feature_dim``; else what differs, e.g. ``["encoder 'tiny_cnn' -> 'resnet18_trunc'"]`` or
    ``["incomplete file"]`` (the resume check)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            if "features" not in handle or "coords" not in handle or "n_patches" not in attrs:
                return ["incomplete file"]
            n = int(attrs["n_patches"])
            changed = []
            for key, value in expected.items():
                stored = attrs.get(key)
                same = (stored is not None and np.isclose(float(stored), value)) if isinstance(value, float) \
                    else str(stored) == str(value)
                if not same:
                    changed.append(f"{key} {stored if stored is None else str(stored)!r} -> {str(value)!r}")
            if handle["features"].shape != (n, feature_dim) or handle["coords"].shape != (n, 2):
                changed.append(f"features {tuple(handle['features'].shape)} -> ({n}, {feature_dim})")
            return changed or None
    except (OSError, KeyError, ValueError):
        return ["unreadable file"]



def _write_bag(path: Path, datasets: dict[str, np.ndarray], attrs: dict, coords_attrs: dict | None = None) -> None:
    """Write one bag file atomically (:func:`milstudy.provenance.atomic_write_h5`: a full disk is one
    ``OSError(ENOSPC)`` naming ``path``)."""
    from milstudy.provenance import atomic_write_h5

    def fill(handle) -> None:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)
        for key, value in attrs.items():
            handle.attrs[key] = value
        for key, value in (coords_attrs or {}).items():  # where TRIDENT's readers look
            handle["coords"].attrs[key] = value

    atomic_write_h5(path, fill)


def _embed(encoder, dataset, batch_size: int, num_workers: int, device, amp: bool, progress, desc: str,
           resize: int | None = None):
    """Features float32 [M, D] and the grid indices [M] of the patches that could be read; ``resize`` resamples
    the uint8 patches to ``resize`` px (bilinear, antialiased) before the encoder."""
    import torch
    from torch.utils.data import DataLoader

    from milstudy.data.patches import collate_patches

    if len(dataset) <= 2 * batch_size:  # starting worker processes costs more than reading a couple of batches
        num_workers = 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_patches,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    chunks, indices, n_failed = [], [], 0
    use_amp = amp and device.type == "cuda"
    bar = progress(total=len(dataset), desc=desc, unit="patch", leave=False)
    with torch.inference_mode():
        for batch in loader:
            n_failed += batch["n_failed"]
            if len(batch["indices"]):
                images = batch["images"].to(device, non_blocking=True)
                if resize and images.shape[-1] != resize:
                    images = torch.nn.functional.interpolate(images.float(), size=(resize, resize), mode="bilinear",
                                                             antialias=True, align_corners=False)
                    images = images.round().clamp(0, 255).to(torch.uint8)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    output = encoder(images)
                chunks.append(output.float().cpu().numpy())
                indices.append(batch["indices"].numpy())
            bar.update(len(batch["indices"]) + batch["n_failed"])
    bar.close()
    if not chunks:
        return np.zeros((0, encoder.out_dim), np.float32), np.zeros(0, np.int64), n_failed
    return np.concatenate(chunks).astype(np.float32), np.concatenate(indices), n_failed


def _instance_labels(row: pd.Series, root: Path | None, coords: np.ndarray, size_level0: int) -> dict:
    """Ground-truth ``instance_labels`` / ``tumour_fraction`` for manifests with a ``mask_path`` column."""
    mask_path = row.get("mask_path")
    if mask_path is None or pd.isna(mask_path) or not str(mask_path):
        return {}
    from milstudy.data.synthetic import instance_labels

    mask_path = Path(str(mask_path))
    if not mask_path.is_absolute() and root is not None:
        mask_path = root / mask_path
    downsample = row.get("mask_downsample")
    fraction, labels = instance_labels(mask_path, coords, size_level0,
                                       mask_downsample=None if downsample is None else float(downsample))
    return {"tumour_fraction": np.asarray(fraction, np.float32), "instance_labels": np.asarray(labels, np.int64)}


def extract_features(
    manifest: str | os.PathLike | pd.DataFrame,
    encoder_name: str,
    out_dir: str | os.PathLike,
    slide_root: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
    shard: str | tuple[int, int] | None = None,
    device: str | None = None,
    amp: bool = True,
    min_tissue: float = 0.5,
    progress: bool = True,
    max_unreadable: float = 0.1,
    slide_mpp: float | None = None,
    allow_outside_root: bool = False,
    coords_dir: str | os.PathLike | None = None,
    resize: int | None = None,
) -> pd.DataFrame:
    """Extract one feature bag per slide of ``manifest`` into ``out_dir``; returns the per-slide summary.

    ``slide_root``: root of relative slide paths (default ``MILSTUDY_SLIDE_ROOT``; for a synthetic cohort pass
    ``cohort.root``). Resolution: the manifest column ``mpp``, else ``slide_mpp``, else the slide's metadata.
    Summary statuses: ``done``, ``skipped`` (already complete with the same settings), ``empty`` (no tissue: an
    empty bag is written), ``failed`` (more than ``max_unreadable`` of its patches could not be read: no bag),
    ``error`` (message).

    Resume is keyed by every setting that changes a bag (encoder, weight hash, resolution, patch size,
    min_tissue, precision, slide and mask file fingerprints; see :func:`slide_settings`): a bag made with other
    settings is redone, and the message says which settings differed. Output files are ``<out>/<slide_id>.h5``;
    a slide_id that would leave ``out_dir`` or collide with another is refused before anything runs.

    ``coords_dir``: reuse patch coordinates instead of tiling (CLAM ``patches/<slide>.h5``, TRIDENT
    ``<slide>_patches.h5`` or our grids; :mod:`milstudy.data.patch_coords`); their footprint must match
    ``target_mpp`` x ``patch_size`` on each slide, and the coordinate file is part of the resume key.
    ``resize``: the encoder sees the patches resampled to this size (e.g. 256-px patches, the CLAM / TRIDENT
    default, for a ViT trained at 224); part of the resume key.
    """
    import torch
    from tqdm.auto import tqdm

    from milstudy.data.manifests import (load_manifest, manifest_lines, open_manifest_slide, output_paths,
                                         resolve_paths, row_mpp)
    from milstudy.data.patch_coords import coords_file, grid_from_coords
    from milstudy.data.patches import PatchDataset
    from milstudy.data.tiling import coords_attributes, tile_slide
    from milstudy.encoders import build_encoder
    from milstudy.paths import slide_root as env_slide_root

    if resize is not None and int(resize) < 1:
        raise ValueError(f"--resize must be a positive number of pixels, got {resize}")
    if not 0.0 <= float(max_unreadable) <= 1.0:
        raise ValueError(f"--max-unreadable must be a fraction in [0, 1], got {max_unreadable}")
    source = "manifest" if isinstance(manifest, pd.DataFrame) else str(manifest)
    loaded = load_manifest(manifest, require=("slide_id", "path"))
    table = resolve_paths(loaded, slide_root, allow_outside_root=allow_outside_root,
                          source=None if isinstance(manifest, pd.DataFrame) else source)
    root = env_slide_root(slide_root)
    out_dir = Path(out_dir)
    targets = dict(zip(table["slide_id"].astype(str), output_paths(
        list(table["slide_id"].astype(str)), out_dir, ".h5", source, manifest_lines(table, manifest))))
    parsed = parse_shard(shard)
    if parsed is not None:
        table = table.iloc[parsed[0]::parsed[1]]
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = build_encoder(encoder_name, weights=weights).eval().to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    expected = _expected_attrs(encoder, target_mpp, patch_size)
    precision = "fp16-autocast" if amp and device.type == "cuda" else "fp32"
    bar_factory = tqdm if progress else (lambda *a, **k: tqdm(*a, **k, disable=True))
    log.info("%d slide(s) -> %s with %s on %s (%s, %g µm/px, %d px)", len(table), out_dir, encoder.name, device,
             precision, target_mpp, patch_size)

    records = []
    slides_bar = bar_factory(table.iterrows(), total=len(table), desc=f"features {encoder.name}", unit="slide")
    for _, row in slides_bar:
        slide_id, start = str(row["slide_id"]), time.perf_counter()
        target = targets[slide_id]
        record = {"slide_id": slide_id, "status": "done", "n_patches": 0, "n_failed": 0, "message": ""}
        mpp = row_mpp(row, slide_mpp)
        settings = slide_settings(row, root, expected, min_tissue, mpp, precision)
        coords_path = coords_file(coords_dir, slide_id) if coords_dir is not None else None
        if resize:
            settings["resize"] = int(resize)
        if coords_dir is not None:
            settings["coords_file"] = _file_fingerprint(coords_path, whole=True) if coords_path else None
        if target.exists():
            changed = bag_difference(target, expected, encoder.out_dim) or settings_difference(target, settings)
            if changed is None:
                import h5py

                with h5py.File(target, "r") as handle:
                    record.update(status="skipped", n_patches=int(handle.attrs["n_patches"]),
                                  message="already complete")
                records.append({**record, "seconds": 0.0})
                log.debug("%s: skipped (already complete)", slide_id)
                continue
            damaged = changed in (["incomplete file"], ["unreadable file"])
            record["message"] = f"redone: {changed[0]}" if damaged else \
                "redone: settings changed (" + "; ".join(changed[:4]) + ")"
        try:
            slide = open_manifest_slide(row["path"], mpp)
            if coords_dir is None:
                grid = tile_slide(slide, target_mpp, patch_size, min_tissue=min_tissue, slide_id=slide_id)
            elif coords_path is None:
                raise FileNotFoundError(f"no patch coordinates for slide {slide_id} in {coords_dir} (looked for "
                                        f"{slide_id}_patches.h5 and {slide_id}.h5, also under patches/)")
            else:
                grid = grid_from_coords(coords_path, slide, target_mpp, patch_size, slide_id)
            if grid.is_empty:
                features, kept, n_failed = np.zeros((0, encoder.out_dim), np.float32), np.zeros(0, np.int64), 0
                record.update(status="empty", message=f"no tissue patches at min_tissue={min_tissue}")
            else:
                features, kept, n_failed = _embed(encoder, PatchDataset(slide, grid), batch_size, num_workers,
                                                  device, amp, bar_factory, slide_id[:24], resize)
            slide.close()
            if len(grid) and n_failed > max_unreadable * len(grid):
                raise _TooManyUnreadable(
                    f"{n_failed} of {len(grid)} patches ({100 * n_failed / len(grid):.0f} %) could not be read, "
                    f"above --max-unreadable {max_unreadable:g}; the slide file is damaged: re-copy or re-export "
                    "it (no bag written)")
            coords = grid.coords[kept].astype(np.int64)
            datasets = {"features": features, "coords": coords,
                        **_instance_labels(row, root, coords, grid.size_level0)}
            attrs = {**expected, "n_patches": len(kept), "n_failed": n_failed, "level": grid.level,
                     "read_size": grid.read_size, "size_level0": grid.size_level0, "slide_mpp": slide.mpp,
                     "min_tissue": float(min_tissue), "slide_id": slide_id, "slide_path": str(row["path"]),
                     "settings": json.dumps(settings, sort_keys=True)}
            _write_bag(target, datasets, attrs, coords_attributes(grid.size_level0, grid.patch_size, target_mpp))
            record.update(n_patches=len(kept), n_failed=n_failed)
            if n_failed:
                record["message"] = "; ".join(filter(None, [record["message"],
                                                            f"{n_failed} unreadable patch(es) skipped"]))
        except _TooManyUnreadable as err:
            record.update(status="failed", n_failed=n_failed, message=str(err))
        except Exception as err:  # noqa: BLE001 - one bad slide (or a full disk) must not end a long job
            record.update(status="error", message=describe_error(err))
        seconds = time.perf_counter() - start
        records.append({**record, "seconds": round(seconds, 3)})
        log.debug("%s: %s, %d patches in %.1f s%s", slide_id, record["status"], record["n_patches"], seconds,
                  f" ({record['message']})" if record["message"] else "")
        slides_bar.set_postfix({"patches/s": f"{record['n_patches'] / max(seconds, 1e-9):.0f}",
                                "batch": batch_size, "workers": num_workers})
    summary = pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS)
    name = "extraction_summary.csv" if parsed is None else f"extraction_summary_shard{parsed[0]}of{parsed[1]}.csv"
    atomic_write(out_dir / name, lambda tmp: summary.to_csv(tmp, index=False))
    return summary


class _TooManyUnreadable(Exception):
    """More than ``max_unreadable`` of a slide's patches failed to decode."""


def describe_error(err: BaseException) -> str:
    """One line for a per-slide failure; a full disk says so."""
    import errno

    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = err.filename or (str(err).splitlines() or [""])[0]
        return f"disk full (ENOSPC) while writing: {where}; free space and rerun (finished slides are kept)"
    if isinstance(err, MemoryError):
        return "out of memory (MemoryError) on this slide; its header may claim an implausible size"
    return f"{type(err).__name__}: " + " ".join(str(err).split())  # one line, whatever a library put in it


# ------------------------------------------------------------------------------------------------------- CLI
def _cmd_extract(args: argparse.Namespace) -> int:
    summary = extract_features(
        args.manifest, args.encoder, args.out, slide_root=args.slide_root, weights=args.weights,
        target_mpp=args.mpp, patch_size=args.patch_size, batch_size=args.batch_size, num_workers=args.workers,
        shard=args.shard, device=args.device, amp=not args.no_amp, min_tissue=args.min_tissue,
        max_unreadable=args.max_unreadable, slide_mpp=args.slide_mpp, allow_outside_root=args.allow_outside_root,
        coords_dir=args.coords, resize=args.resize, progress=not progress_disabled(args),
    )
    counts = summary["status"].value_counts().to_dict()
    headline = f"{len(summary)} slides: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" -> {args.out}"
    return report_slide_statuses(summary, headline, failing=("error", "failed"), quiet=("done", "skipped"))


def add_commands(subparsers) -> None:
    """Register ``milstudy features extract``."""
    features = subparsers.add_parser("features", help="feature bags from slides")
    sub = features.add_subparsers(dest="features_command", metavar="ACTION")
    extract = sub.add_parser("extract", help="embed tissue patches of every slide of a manifest into HDF5 bags")
    extract.add_argument("--manifest", required=True, help="manifest CSV (slide_id, path, ...)")
    extract.add_argument("--encoder", required=True, help="encoder name (see milstudy.encoders.list_encoders())")
    extract.add_argument("--out", required=True, help="output folder (one <slide_id>.h5 per slide)")
    extract.add_argument("--slide-root", default=None, help="root of relative slide paths (default $MILSTUDY_SLIDE_ROOT)")
    extract.add_argument("--weights", default=None, help="local encoder weights (safetensors or state dict)")
    extract.add_argument("--mpp", type=float, default=0.5, help="target µm/px (20x ~ 0.5, 10x ~ 1.0)")
    extract.add_argument("--patch-size", type=int, default=256, help="patch size in pixels at the target µm/px")
    extract.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a patch")
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument("--workers", type=int, default=2, help="DataLoader worker processes reading patches")
    extract.add_argument("--shard", default=None, help="i/n: process manifest rows i, i+n, ... (array jobs)")
    extract.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    extract.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    extract.add_argument("--max-unreadable", type=float, default=0.1,
                         help="fraction of unreadable patches above which a slide fails (default 0.1)")
    extract.add_argument("--slide-mpp", type=float, default=None,
                         help="µm/px of level 0 for slides without metadata (a manifest 'mpp' column wins)")
    extract.add_argument("--allow-outside-root", action="store_true",
                         help="accept manifest paths that climb out of --slide-root with '..'")
    extract.add_argument("--coords", default=None,
                         help="reuse patch coordinates from this folder (CLAM patches/<slide>.h5, TRIDENT "
                              "<slide>_patches.h5, or `milstudy data tile` grids) instead of tiling")
    extract.add_argument("--resize", type=int, default=None,
                         help="resample patches to this many px before the encoder (e.g. 224 for 256-px patches)")
    add_logging_flags(extract)
    extract.set_defaults(func=_cmd_extract)
    features.set_defaults(func=lambda args: (features.print_help(), 2)[1])
