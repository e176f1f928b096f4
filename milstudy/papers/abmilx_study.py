"""Study runs of the ABMILX notebooks 10 (E1 sparsity vs performance, E6 optimisation risk) and 13 (E5 E2E vs
two-stage, E7 feature geometry, E8 attention maps) (specs/abmilx.md §4.3): data with instance ground truth, tracked
E2E runs over seeds, per-seed summaries, and the two-stage arms.

- ``load_detection_slides``: the CAMELYON-like synthetic detection cohort as ``E2ESlide`` per split, with patch
  labels (``instance_labels``) attached; optionally a stratified subset of slides for the CPU time budget.
- ``run_tracked_e2e``: ``train_e2e`` for every (config, seed) with an ``AttentionTracker`` on a few fixed slides
  (per-epoch curves) and a final analysis of every test slide (sparsity, risk, Λ, localization).
- ``summarize_runs``: mean ± sd over seeds per run; the paper's tables and claims are in ``milstudy.papers.abmilx``.
- ``build_strong_encoder``, ``encode_bags``, ``run_two_stage``: the two-stage arms of notebook 13.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from milstudy.analysis.tracking import AttentionTracker, EpochRecords
from milstudy.papers.abmilx import PAPER_E1, PAPER_E5_CAMELYON, e1_aggregators, e1_claims, e1_table  # noqa: F401 (notebook API)
from milstudy.papers.grids import mean_std


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class DetectionData:
    """Slides per split (``E2ESlide`` with ``instance_labels``), the task, the cohort and the manifest rows used."""

    splits: dict[str, list]
    task: Any
    cohort: Any
    manifest: pd.DataFrame

    def positives(self, split: str) -> list:
        return [s for s in self.splits[split] if s.instance_labels is not None and s.instance_labels.sum() > 0]


def stratified_subset(manifest: pd.DataFrame, max_slides: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``max_slides`` rows, keeping each (split, label) group's share (at least one row per group)."""
    if max_slides is None or max_slides >= len(manifest):
        return manifest.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in manifest.groupby(["split", "label"], sort=True):
        n = max(1, int(round(max_slides * len(group) / len(manifest))))
        keep.extend(rng.choice(group.index.to_numpy(), size=min(n, len(group)), replace=False).tolist())
    return manifest.loc[sorted(keep)].reset_index(drop=True)


def read_detection_manifest(manifest: str | Path, slide_root: str | Path | None = None) -> pd.DataFrame:
    """A real (or any) detection manifest with absolute ``path`` and ``mask_path``.

    Needs ``slide_id, case_id, path, label, split``; ``mask_path`` / ``mask_downsample`` give patch labels
    (``milstudy data masks`` writes them from CAMELYON XML). Relative paths resolve against ``slide_root``
    (default ``MILSTUDY_SLIDE_ROOT``, else the manifest's folder); rows without a mask keep ``mask_path`` empty.
    """
    import os

    from milstudy.data.manifests import load_manifest, resolve_paths
    from milstudy.paths import slide_root as default_root

    root = slide_root or default_root(None) or Path(manifest).resolve().parent
    frame = resolve_paths(load_manifest(manifest, require=("slide_id", "case_id", "path", "label", "split")), root)
    if "mask_path" not in frame:
        frame["mask_path"], frame["mask_downsample"] = "", np.nan
    masks = frame["mask_path"].fillna("").astype(str)
    frame["mask_path"] = [m if not m or os.path.isabs(m) else str(Path(root) / m) for m in masks]
    return frame


def load_detection_slides(
    profile: str,
    seed: int = 0,
    max_slides: int | None = None,
    main_mpp: float = 2.0,
    patch_size: int = 32,
    manifest: str | Path | None = None,
    slide_root: str | Path | None = None,
    load_banks: bool = True,
    **cohort_overrides: Any,
) -> DetectionData:
    """Detection slides as E2E slides with patch labels per split: the synthetic CAMELYON-like cohort of
    ``profile``, or the cohort of ``manifest`` (:func:`read_detection_manifest`; required by the paper profile).

    Patch label = tumour fraction ≥ 0.5 of the patch's level-0 square (``milstudy.data.synthetic.instance_labels``);
    slides without a mask have ``instance_labels = None``. ``max_slides`` takes a stratified subset
    (:func:`stratified_subset`) to fit a time budget. ``load_banks=False`` reads patches from the slides through
    OpenSlide when needed instead of caching every slide's patches (real cohorts at 20x).
    """
    from milstudy.data.synthetic import cohort_for_profile, instance_labels
    from milstudy.data.e2e_slides import slides_from_manifest, split_slides
    from milstudy.train.tasks import build_task

    cohort = None
    if manifest is not None:
        frame = read_detection_manifest(manifest, slide_root)
    elif profile == "paper":
        raise ValueError(
            "the 'paper' profile reads a real detection cohort (e.g. CAMELYON16): pass manifest= (notebook 10: "
            "-p manifest=FILE), a CSV with slide_id, case_id, path, label, split and, for patch labels, mask_path / "
            "mask_downsample; `milstudy data masks` writes one from the lesion XML files")
    else:
        cohort = cohort_for_profile(profile, task="detection", seed=seed, **cohort_overrides)
        frame = cohort.manifest
    frame = stratified_subset(frame, max_slides, seed)
    slides = slides_from_manifest(frame, "label", main_mpp, patch_size, load_banks=load_banks, progress=False)
    rows = frame.set_index("slide_id")
    for slide in slides:
        row = rows.loc[slide.slide_id]
        if isinstance(row.get("mask_path"), str) and row["mask_path"]:
            _, slide.instance_labels = instance_labels(row, slide.coords, slide.main_grid.size_level0)
    splits = split_slides(slides, dict(zip(frame["slide_id"].astype(str), frame["split"].astype(str))))
    return DetectionData(splits, build_task({"type": "classification"}, [s.target for s in slides]), cohort, frame)


def pick_tracked_slides(slides: Sequence[Any], n: int = 2) -> list:
    """``n`` positive slides with the median-ish witness rates (stable choice: sorted by witness rate, then id)."""
    positives = [s for s in slides if s.instance_labels is not None and 0 < s.instance_labels.sum() < len(s.coords)]
    if not positives:
        raise ValueError("no positive slide with instance labels to track; use a larger cohort or another split")
    positives.sort(key=lambda s: (float(s.instance_labels.mean()), s.slide_id))
    middle = len(positives) // 2
    start = max(0, min(middle - n // 2, len(positives) - n))
    return positives[start:start + n]


# --------------------------------------------------------------------------------------------------- E2E runs
@dataclass
class StudyRuns:
    """Everything the notebooks plot: one row per (run, seed) in ``runs``; per-epoch tracker rows ``curves`` and
    Λ rows ``modulation`` on the tracked slides; ``final`` / ``final_modulation``: per-test-slide analysis at the
    selected epoch; ``history`` (train loss etc.); ``snapshots[(run, seed)] = {epoch: {slide_id: [heads, N]}}``;
    ``models[(run, seed)]`` when kept; ``features[(run, seed)] = {slide_id: [N, D]}`` of the final encoder."""

    runs: pd.DataFrame
    curves: pd.DataFrame
    modulation: pd.DataFrame
    final: pd.DataFrame
    final_modulation: pd.DataFrame
    history: pd.DataFrame
    snapshots: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)


def run_tracked_e2e(
    configs: Mapping[str, Any],
    data: DetectionData,
    seeds: Sequence[int],
    track_slides: Sequence[Any],
    keep_models: bool = False,
    feature_slides: Sequence[Any] = (),
    progress: bool = True,
) -> StudyRuns:
    """``train_e2e`` for every named ``E2EConfig`` × seed, tracking ``track_slides`` every epoch and analysing
    every test slide at the selected epoch. ``feature_slides``: slides whose final instance features are kept."""
    from tqdm.auto import tqdm

    from milstudy.train.e2e import encode_chunked, train_e2e

    rows, histories = [], []
    curves, final = EpochRecords(), EpochRecords()
    snapshots, models, features = {}, {}, {}
    test = data.splits.get("test", [])
    for name, seed in tqdm([(n, s) for n in configs for s in seeds], desc="E2E runs", disable=not progress):
        config = replace(configs[name], seed=int(seed))
        tracker = AttentionTracker(track_slides, run=name, seed=seed)
        result = train_e2e(data.splits, data.task, config, callbacks=[tracker], keep_model=True)
        curves.extend(tracker.records)
        snapshots[(name, seed)] = tracker.records.attention
        if test:
            final_tracker = AttentionTracker(test, run=name, seed=seed)
            final_tracker.record(result.best_epoch, result.model)
            final.extend(final_tracker.records)
        row = {"run": name, "seed": seed, "best_epoch": result.best_epoch, "epochs": len(result.history),
               "wall_time_s": result.wall_time, "alpha_final": _alpha(result.model)}
        row.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
        row.update({f"val_{k}": v for k, v in result.val_metrics.items()})
        rows.append(row)
        histories.append(result.history.assign(run=name, seed=seed))
        if feature_slides:
            device = next(result.model.parameters()).device
            with torch.no_grad():
                features[(name, seed)] = {
                    s.slide_id: encode_chunked(result.model.encoder.eval(), s.read("main", np.arange(s.n_main)),
                                               1024, device).cpu().numpy() for s in feature_slides}
        if keep_models:
            models[(name, seed)] = result.model
    return StudyRuns(pd.DataFrame(rows), curves.slides, curves.modulation, final.slides, final.modulation,
                     pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(), snapshots, models,
                     features)


def _alpha(model: torch.nn.Module) -> float:
    from milstudy.analysis.modulation import model_alpha

    return model_alpha(model)


def per_seed_slide_means(final: pd.DataFrame) -> pd.DataFrame:
    """Average the per-test-slide analysis within each (run, seed): sparsity over all slides and positives only,
    risk / localization over positives. One row per (run, seed)."""
    rows = []
    for (run, seed), part in final.groupby(["run", "seed"], sort=False):
        pos = part[part["positive"]]
        rows.append({
            "run": run, "seed": seed,
            "sparsity_all": part["sparsity"].mean(), "sparsity_pos": pos["sparsity"].mean(),
            "gini": part["gini"].mean(), "normalized_entropy": part["normalized_entropy"].mean(),
            "mass90_fraction": part["mass90_fraction"].mean(),
            **{c: pos[c].mean() for c in ("risk", "n_risk", "risk_mh", "mass_on_tumour", "top1_is_noise",
                                          "head_correlation", "instance_auroc", "top_k_precision") if c in pos},
        })
    return pd.DataFrame(rows)


def summarize_runs(study: StudyRuns, metric: str = "test_auc") -> pd.DataFrame:
    """Mean ± std over seeds per run of the test metric and every per-slide analysis (test slides)."""
    merged = study.runs.merge(per_seed_slide_means(study.final), on=["run", "seed"], how="left")
    columns = [metric, "sparsity_all", "sparsity_pos", "gini", "normalized_entropy", "instance_auroc",
               "top_k_precision", "risk", "n_risk", "risk_mh", "mass_on_tumour", "top1_is_noise", "head_correlation",
               "alpha_final", "wall_time_s"]
    return mean_std(merged, "run", columns)


# ------------------------------------------------------------------------------------------- two-stage (nb 13)
def build_strong_encoder(
    profile: str,
    seed: int = 0,
    encoder: str = "tiny_cnn",
    epochs: int = 4,
    n_slides: int | None = None,
    lr: float = 1e-3,
    progress: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Pre-train ``encoder`` on patch labels of a *separate* synthetic detection cohort (other seed, positives only)
    and cache the weights under ``cache_root()/encoders``; returns (weights path, info). Spec §4.1 "FM-like"."""
    from milstudy.data.synthetic import cohort_for_profile, instance_labels
    from milstudy.encoders import build_encoder
    from milstudy.paths import cache_root
    from milstudy.data.e2e_slides import slides_from_manifest
    from milstudy.train.patch_pretrain import pretrain_on_patch_labels, save_encoder

    overrides: dict[str, Any] = {"positive_fraction": 1.0, "witness_rate_range": (0.05, 0.3)}
    if n_slides is not None:
        overrides["n_slides"] = n_slides
    if profile == "cpu":
        overrides.setdefault("n_slides", 16)
        overrides["size_range"] = (2048, 2048)
    key = json.dumps({"profile": profile, "seed": seed, "encoder": encoder, "epochs": epochs, "lr": lr,
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}}, sort_keys=True)
    path = cache_root() / "encoders" / f"strong_{encoder}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"
    cohort = cohort_for_profile("smoke" if profile == "smoke" else "cpu", task="detection", seed=10_000 + seed,
                                **overrides)
    info = {"cohort": str(cohort.root), "n_slides": len(cohort.manifest), "weights": str(path)}
    if path.exists():
        return str(path), {**info, "cached": True}
    slides = slides_from_manifest(cohort.manifest, "label", progress=False)
    rows = cohort.manifest.set_index("slide_id")
    patches, labels = [], []
    for slide in slides:
        patches.append(slide.main)
        labels.append(instance_labels(rows.loc[slide.slide_id], slide.coords, slide.main_grid.size_level0)[1])
    patches_all, labels_all = np.concatenate(patches), np.concatenate(labels)
    model = build_encoder(encoder, seed=10_000 + seed)
    model, losses = pretrain_on_patch_labels(model, patches_all, labels_all, epochs=epochs, lr=lr, seed=seed,
                                             progress=progress)
    save_encoder(model, path)
    return str(path), {**info, "cached": False, "n_patches": int(len(labels_all)),
                       "tumour_share": float(labels_all.mean()), "losses": losses}


@torch.no_grad()
def encode_bags(slides: Sequence[Any], encoder: torch.nn.Module, chunk: int = 1024) -> list:
    """Every main-scale patch of each ``E2ESlide`` through a frozen ``encoder`` -> ``Bag`` (features ``[N, D]``,
    coords, instance labels, target) for the two-stage trainer."""
    from milstudy.data.bags import Bag
    from milstudy.train.e2e import encode_chunked

    encoder = encoder.eval()
    device = next(encoder.parameters()).device
    bags = []
    for s in slides:
        feats = encode_chunked(encoder, s.read("main", np.arange(s.n_main)), chunk, device).cpu()
        labels = None if s.instance_labels is None else torch.as_tensor(s.instance_labels)
        bags.append(Bag(feats, s.slide_id, s.target, torch.as_tensor(s.coords), labels))
    return bags


def run_two_stage(
    bags: Mapping[str, Sequence[Any]],
    task: Any,
    aggregator: str,
    aggregator_kwargs: Mapping[str, Any],
    seeds: Sequence[int],
    config: Any,
    name: str,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Two-stage MIL (frozen features) for every seed: returns (runs rows, per-test-slide analysis rows, models).

    bags: split -> list of ``Bag``; config: ``TrainConfig`` (its seed is replaced per run). Without "val" bags the
    training bags stand in for selection (the trainer needs a validation set), i.e. no held-out model selection,
    like an E2E run without validation; the test bags are never used for selection.
    """
    from milstudy.analysis.tracking import track_two_stage
    from milstudy.data.bags import BagListDataset
    from milstudy.models import build_model
    from milstudy.train.two_stage import seed_everything, train_two_stage

    rows, finals, models = [], [], {}
    in_dim = int(bags["train"][0].features.shape[1])
    for seed in seeds:
        seed_everything(int(seed))
        model = build_model(aggregator, in_dim, task.n_out or 2, **aggregator_kwargs)
        val = bags.get("val") or bags["train"]
        result = train_two_stage(model, task, BagListDataset(bags["train"]), BagListDataset(val),
                                 BagListDataset(bags.get("test", [])), replace(config, seed=int(seed)))
        row = {"run": name, "seed": seed, "best_epoch": result.best_epoch, "wall_time_s": result.wall_time}
        row.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
        rows.append(row)
        if bags.get("test"):
            finals.append(track_two_stage(model, bags["test"], result.best_epoch, run=name, seed=seed).slides)
        models[(name, seed)] = model
    return pd.DataFrame(rows), pd.concat(finals, ignore_index=True) if finals else pd.DataFrame(), models


def slide_thumbnail(data: Any, slide: Any, max_size: int = 512) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(thumbnail uint8 ``[h, w, 3]``, level-0 px per thumbnail px, tumour mask bool or None) of a slide of
    ``data`` (a :class:`DetectionData`, or a synthetic cohort), for :func:`milstudy.plots.attention_heatmap`."""
    from milstudy.data.slides import open_slide
    from milstudy.data.synthetic import read_tumour_mask

    row = data.manifest.set_index("slide_id").loc[slide.slide_id]
    with open_slide(row["path"]) as handle:
        thumbnail = handle.thumbnail(max_size)
        width0 = handle.level_dimensions[0][0]
    mask_path = row.get("mask_path")
    mask = read_tumour_mask(mask_path) if isinstance(mask_path, str) and mask_path else None
    return thumbnail, width0 / thumbnail.shape[1], mask
