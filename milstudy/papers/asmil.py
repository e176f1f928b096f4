"""ASMIL study helpers (specs/asmil.md §4.1, §4.3 S1/S6): the synthetic feature-bag world, the variants that are
compared, a grid of two-stage runs with per-epoch attention snapshots, and the claims table of notebook 20.

**World** (spec §4.1, our choice): the frozen S-vec detection world (``milstudy.papers.svec``: irregular tissue
grids of 4 benign tissue types, 1-3 tumour foci, benign mimics sharing part of the tumour cue, slide-level stain
offsets) read as *feature bags*: each patch's 32-d descriptor is its feature (no encoder), with the spec's
harder settings on top: foci covering 0.5-10 % of the tissue, 200-800 patches per bag, and ``label_noise`` of
the *training* labels flipped (a small noisy training set, what makes attention wander; validation and test labels
stay clean). Instance labels and coordinates come with every bag. Notebook 20 also trains on a random half of each
bag's instances per epoch (``TrainConfig.instance_share``, a common MIL augmentation): without that per-epoch
instance noise ABMIL's attention converges within about 12 epochs (late JSD 3e-4, the adbcd92 record), so there
is no late oscillation for an anchor to remove; with it, the late JSD stays near 0.1 (measured before the change).

**Runs**: ``run_dynamics`` trains every variant for every seed with ``train_two_stage`` at a constant learning
rate (spec §4.2: instability is measured before any cosine tail), snapshots the eval-mode attention of the tracked
test slides after every epoch, and returns tidy frames: per-run metrics, per-slide test predictions, the
stability table (JSD to the next and to the final epoch, normalised entropy) and the training history. Runs are
independent and deterministic given (variant, seed), so ``workers > 1`` spreads them over processes (one torch
thread each) without changing a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from milstudy.analysis.claims import Claim, claims_table
from milstudy.parallel import process_map

# name -> (registry name, model kwargs). Anchor defaults: EMA, beta 0.999 per step, lambda 1, per-distribution KL.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ABMIL": ("abmil", {}),
    "ABMIL + anchor": ("abmil_anchor", {}),
    "ABMIL + anchor + NSF": ("abmil_anchor_nsf", {}),
    "ABMIL + uniform target": ("abmil_anchor_nsf", {"anchor_mode": "uniform_target"}),
    "ABMIL + frozen random anchor": ("abmil_anchor_nsf", {"anchor_mode": "frozen_random"}),
    "ABMIL + per-epoch anchor + NSF": ("abmil_anchor_nsf", {"anchor_update": "epoch"}),
    # S7, alternatives to NSF (App. F, G): an entmax-1.5 anchor target; NSF also in the online model; the online
    # softmax/NSF mixture of Eq. 34 with a learnt alpha (reported as ``mixture_alpha``). The anchor's NSF target
    # normalises its raw scores in both online variants (``AnchoredMIL.anchor_logits``).
    "ABMIL + entmax-1.5 anchor": ("abmil_anchor", {"anchor_target": "entmax", "entmax_alpha": 1.5}),
    "ABMIL + anchor + NSF, NSF online": ("abmil_anchor_nsf", {"attention_normalization": "nsf"}),
    "ABMIL + anchor + NSF, mixture online (Eq. 34)": ("abmil_anchor_nsf", {"attention_normalization": "mixture"}),
    "ABMIL + anchor + NSF (1/N KL)": ("abmil_anchor_nsf", {"kl_reduction": "upstream"}),
    "ABMIL + uniform target (1/N KL)": ("abmil_anchor_nsf", {"anchor_mode": "uniform_target",
                                                            "kl_reduction": "upstream"}),
    # a weaker KL (S8's lambda), where the anchor and the uniform target keep attention about as sharp
    "ABMIL + anchor + NSF (λ = 0.1)": ("abmil_anchor_nsf", {"anchor_lambda": 0.1}),
    "ABMIL + uniform target (λ = 0.1)": ("abmil_anchor_nsf", {"anchor_mode": "uniform_target", "anchor_lambda": 0.1}),
    # with ABMIL (λ = 0), λ = 0.1 and λ = 1 these span late entropies from ABMIL's to uniform: the matched-entropy
    # control family of ``matched_entropy_control``
    "ABMIL + uniform target (λ = 0.03)": ("abmil_anchor_nsf", {"anchor_mode": "uniform_target",
                                                              "anchor_lambda": 0.03}),
    "ABMIL + uniform target (λ = 0.3)": ("abmil_anchor_nsf", {"anchor_mode": "uniform_target", "anchor_lambda": 0.3}),
    "ABMIL + uniform target (λ = 0.6)": ("abmil_anchor_nsf", {"anchor_mode": "uniform_target", "anchor_lambda": 0.6}),
    # AEM (attention entropy maximisation, aux loss -β · H(a); no anchor): the released frozen random anchor's
    # near-uniform NSF target makes its KL an AEM-like regulariser (spec §3.1); AEM itself is a flattening control
    "ABMIL + AEM (β = 1)": ("abmil_anchor", {"anchor_mode": "none", "aem_weight": 1.0}),
    "ABMIL + AEM (β = 0.1)": ("abmil_anchor", {"anchor_mode": "none", "aem_weight": 0.1}),
    "CLAM-SB": ("clam_sb", {}),
    "CLAM-SB + anchor + NSF": ("clam_sb_anchor_nsf", {}),
    "DSMIL": ("dsmil", {}),
    "DSMIL + anchor + NSF": ("dsmil_anchor_nsf", {}),
    "DSMIL + uniform target": ("dsmil_anchor_nsf", {"anchor_mode": "uniform_target"}),
    "TransMIL": ("transmil", {}),
    "TransMIL + anchor + NSF": ("transmil_anchor_nsf", {}),
    "ASMIL": ("asmil", {}),
    "ASMIL without anchor": ("asmil_net", {}),
}
SMALL_ASMIL = {"dim": 64, "heads": 4, "n_tokens": 4}  # cpu profile: 1/4 of the default cost (spec §2.9: 128/8/8)
WORLD_OVERRIDES = {"witness_rate": (0.005, 0.1), "n_patches": (200, 800)}


@dataclass
class AsmilData:
    """Feature bags per split (``milstudy.data.bags.Bag``), the task, the world and the flipped training slides;
    ``patch_classes[slide_id]``: int ``[N]`` per-patch lesion classes where a world has more than lesion / not
    (the BRACS-like world's 0 benign, 1 atypical, 2 malignant; ``instance_labels`` stay lesion / not);
    ``centres[slide_id]``: the slide's centre where a world has centres (the CAMELYON-17-like world)."""

    bags: dict[str, list]
    task: Any
    world: Any
    flipped: list[str] = field(default_factory=list)
    patch_classes: dict[str, Any] = field(default_factory=dict)
    centres: dict[str, int] = field(default_factory=dict)


def asmil_bags(profile: str = "cpu", seed: int = 1, label_noise: float = 0.1, n_slides: int | None = None,
               **world_overrides: Any) -> AsmilData:
    """The S1/S6 world (module docstring): the frozen S-vec detection world as feature bags, ``label_noise`` of the
    training labels flipped (seeded by the world's ``seed``), ``world_overrides`` on top of ``WORLD_OVERRIDES``."""
    import torch

    from milstudy.data.bags import Bag
    from milstudy.data.synthetic.descriptors import descriptor_cohort
    from milstudy.papers.svec import SMOKE_WORLD, calibrated_world

    if not 0 <= label_noise < 0.5:
        raise ValueError(f"asmil_bags: label_noise must be in [0, 0.5), got {label_noise}")
    design = {**WORLD_OVERRIDES, **(SMOKE_WORLD if profile == "smoke" else {}), **world_overrides}
    if n_slides:
        design["n_slides"] = int(n_slides)
    world = calibrated_world("detection", seed=seed, **design)
    cohort = descriptor_cohort(world)
    rng = np.random.default_rng([seed, 7])
    bags, flipped = {}, []
    for split, slides in cohort.splits.items():
        out = []
        for s in slides:
            target = int(s.target)
            if split == "train" and rng.random() < label_noise:
                target, _ = 1 - target, flipped.append(s.slide_id)
            labels = None if s.instance_labels is None else torch.as_tensor(s.instance_labels)
            out.append(Bag(torch.as_tensor(s.main), s.slide_id, target, torch.as_tensor(s.coords), labels))
        bags[split] = out
    return AsmilData(bags, cohort.task, world, flipped)


def variant_spec(name: str, small: bool = False, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 specs: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None) -> tuple[str, dict[str, Any]]:
    """(registry name, kwargs) of a variant of :data:`VARIANTS` or ``specs`` (more variants, e.g. a sweep's);
    ``small``: the cpu-profile ASMIL size; ``overrides[name]`` on top."""
    table = {**VARIANTS, **(specs or {})}
    if name not in table:
        raise ValueError(f"unknown ASMIL study variant {name!r}; choose from {list(table)}")
    registry, kwargs = table[name]
    kwargs = dict(kwargs)
    if small and registry.startswith("asmil"):
        kwargs = {**SMALL_ASMIL, **kwargs}  # a variant's own size (e.g. S8's number of tokens K) wins
    kwargs.update((overrides or {}).get(name, {}))
    return registry, kwargs


def _one_run(job: dict[str, Any], data: AsmilData) -> dict[str, Any]:
    """Train one (variant, seed) and return its tidy frames (runs in a worker process or in-line)."""
    import time

    from milstudy.analysis.stability import stability_table
    from milstudy.data.bags import BagListDataset
    from milstudy.models import build_model
    from milstudy.train.optim import seed_everything
    from milstudy.train.two_stage import train_two_stage

    name, seed = job["variant"], job["seed"]
    registry, kwargs = job["spec"]
    seed_everything(seed)
    in_dim = int(data.bags["train"][0].features.shape[-1])
    model = build_model(registry, in_dim, data.task.n_out, **kwargs)
    config = replace(job["config"], seed=seed)
    start = time.perf_counter()
    fit = train_two_stage(model, data.task, BagListDataset(data.bags["train"]), BagListDataset(data.bags["val"]),
                          BagListDataset(data.bags["test"]), config)
    wall = time.perf_counter() - start
    tag = {"method": name, "seed": seed}
    localization, froc_score = _localization(fit.attention, data.bags["test"])
    stability = stability_table(fit.attention_snapshots).assign(**tag)
    history = fit.history.assign(**tag)
    predictions = fit.predictions
    predictions = predictions[predictions["split"] == "test"].assign(**tag)
    row = {**tag, "best_epoch": fit.best_epoch, "wall_s": wall, "train_s_per_epoch": fit.train_time / len(fit.history),
           **{f"test_{k}": v for k, v in (fit.test_metrics or {}).items()},
           **{f"val_{k}": v for k, v in fit.val_metrics.items()}, "froc": froc_score}
    normalization = getattr(getattr(model, "online", model), "normalization", None)
    if getattr(normalization, "alpha", None) is not None:
        row["mixture_alpha"] = normalization.alpha  # Eq. 34's learnt softmax weight (the paper: 0.989-0.996)
    return {"run": row, "predictions": predictions, "stability": stability, "history": history,
            "localization": localization.assign(**tag)}


def _localization(attention: Mapping[str, np.ndarray], bags: Sequence[Any]) -> tuple[pd.DataFrame, float]:
    """Per test slide: instance AUROC (positive slides), Dice / specificity / success (spec §4.2) of the
    eval-mode attention read-out (head mean) of the selected model; and the run's FROC over the test slides."""
    from milstudy.analysis.localization import froc, instance_auroc, localization_scores

    rows, slides = [], []
    for bag in bags:
        if bag.slide_id not in attention or bag.instance_labels is None:
            continue
        scores = np.asarray(attention[bag.slide_id], np.float64)
        labels, coords = bag.instance_labels.numpy(), bag.coords.numpy()
        row = {"slide_id": bag.slide_id, "positive": bool(labels.any()),
               **localization_scores(scores, labels, coords)}
        row["instance_auroc"] = instance_auroc(scores, labels) if 0 < labels.sum() < len(labels) else np.nan
        rows.append(row)
        slides.append((scores.mean(0) if scores.ndim == 2 else scores, labels, coords))
    has_lesion = any(s[1].any() for s in slides)
    return pd.DataFrame(rows), froc(slides)["score"] if has_lesion else float("nan")


@dataclass
class Dynamics:
    """Tidy frames of a grid of runs (one row per run / per test slide and run / per tracked slide, run and epoch
    / per epoch and run)."""

    runs: pd.DataFrame
    predictions: pd.DataFrame
    stability: pd.DataFrame
    history: pd.DataFrame
    localization: pd.DataFrame = field(default_factory=pd.DataFrame)

    def per_slide(self, late_from: float = 0.5) -> pd.DataFrame:
        """One row per (method, seed, slide_id): ``early_jsd`` / ``late_jsd``, the mean JSD to the next epoch over
        the steps e -> e + 1 (e >= 1) before / from the ``late_from`` share of them on (with a single step, both are
        that step), and ``late_entropy``, the mean normalised entropy over the late steps. The halves are cut per
        run, so runs of different lengths (ASMIL's longer schedule) each get their own."""
        frame = self.stability.dropna(subset=["jsd_next"])
        keys = ["method", "seed", "slide_id"]
        parts = []
        for _, run in frame.groupby(["method", "seed"], sort=False):
            steps = sorted(run["epoch"].unique())
            if len(steps) > 1:  # epoch 0 (before training) -> 1 is the initial move, not oscillation
                steps = steps[1:]
            cut = min(max(1, int(round(late_from * len(steps)))), len(steps) - 1) if len(steps) > 1 else 0
            early = run[run["epoch"].isin(steps[:max(cut, 1)])].groupby(keys)["jsd_next"].mean()
            late = run[run["epoch"].isin(steps[cut:])].groupby(keys)
            parts.append(pd.DataFrame({"early_jsd": early, "late_jsd": late["jsd_next"].mean(),
                                       "late_entropy": late["normalized_entropy"].mean()}))
        if not parts:
            return pd.DataFrame(columns=[*keys, "early_jsd", "late_jsd", "late_entropy"])
        return pd.concat(parts).sort_index().reset_index()

    def per_seed(self) -> pd.DataFrame:
        """One row per (method, seed): the slide means of :meth:`per_slide` beside the run's test metrics."""
        slides = self.per_slide().groupby(["method", "seed"])[["early_jsd", "late_jsd", "late_entropy"]].mean()
        frame = self.runs.merge(slides.reset_index(), on=["method", "seed"], how="left")
        if not self.localization.empty:
            positive = self.localization[self.localization["positive"]]
            loc = positive.groupby(["method", "seed"])[["instance_auroc", "dice"]].mean()
            frame = frame.merge(loc.reset_index(), on=["method", "seed"], how="left")
        return frame


def run_dynamics(data: AsmilData, variants: Sequence[str], seeds: Sequence[int], config: Any,
                 n_tracked: int = 20, small: bool = False, workers: int = 1,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True,
                 config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 specs: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None) -> Dynamics:
    """Train every variant x seed (module docstring). ``config``: a ``TrainConfig`` (its seed is replaced per run);
    the first ``n_tracked`` test slides are snapshotted every epoch. ``workers``: processes (one thread each).
    ``overrides[name]``: model kwargs of a variant; ``config_overrides[name]``: ``TrainConfig`` fields of a variant
    (e.g. ``{"epochs": 50}`` for ASMIL's longer schedule); ``specs``: variants beyond :data:`VARIANTS`."""
    tracked = [b.slide_id for b in data.bags["test"][:n_tracked]]
    config = replace(config, snapshot_slides=tracked, quiet=True)
    unknown = sorted(set(config_overrides or {}) - set(variants))
    if unknown:
        raise ValueError(f"run_dynamics: config_overrides name variants that are not run: {unknown}")
    jobs = [{"variant": v, "seed": int(s), "spec": variant_spec(v, small, overrides, specs),
             "config": replace(config, **(config_overrides or {}).get(v, {}))} for v in variants for s in seeds]
    results = process_map(_one_run, jobs, workers, progress, shared=data)
    return Dynamics(pd.DataFrame([r["run"] for r in results]),
                    pd.concat([r["predictions"] for r in results], ignore_index=True),
                    pd.concat([r["stability"] for r in results], ignore_index=True),
                    pd.concat([r["history"] for r in results], ignore_index=True),
                    pd.concat([r["localization"] for r in results], ignore_index=True))


def _mean_of(column: str):
    def metric(frame: pd.DataFrame) -> float:
        return float(frame[column].mean())
    metric.__name__ = f"mean_{column}"
    return metric


# (statement, A, B, metric, direction, paper A, paper B, units, source). "late_jsd": mean JSD to the next epoch over
# the second half of training, per tracked test slide; "jsd" compares the halves of one method (``PHASES``).
PHASES = ("ABMIL, second half", "ABMIL, first half")
# The uniform-target family by KL weight (λ = 0 is bare ABMIL) and the anchors judged against it at matched entropy.
UNIFORM_FAMILY = ("ABMIL", "ABMIL + uniform target (λ = 0.03)", "ABMIL + uniform target (λ = 0.1)",
                  "ABMIL + uniform target (λ = 0.3)", "ABMIL + uniform target (λ = 0.6)", "ABMIL + uniform target")
MATCHED_ANCHORS = ("ABMIL + anchor + NSF", "ABMIL + anchor + NSF (λ = 0.1)", "ABMIL + anchor + NSF (1/N KL)")
MATCHED_PREFIX = "uniform target at the entropy of "
DYNAMICS_CLAIMS = [
    ("ABMIL's attention keeps moving: its JSD per epoch does not fall in the second half", *PHASES, "jsd",
     "greater", None, None, "", "Fig. 1 (oscillates instead of converging)"),
    ("The EMA anchor + NSF lowers ABMIL's late attention instability", "ABMIL + anchor + NSF", "ABMIL",
     "late_jsd", "less", None, None, "", "Fig. 1, §4.1"),
    ("... also with the released 1/N KL scaling", "ABMIL + anchor + NSF (1/N KL)", "ABMIL", "late_jsd", "less",
     None, None, "", "spec §2.5"),
    ("... more than a uniform target of the same weight does (stabilisation, not flattening)",
     "ABMIL + anchor + NSF (1/N KL)", "ABMIL + uniform target (1/N KL)", "late_jsd", "less", None, None, "",
     "spec §4.3 S6"),
    ("The EMA anchor + NSF at λ = 0.1 lowers ABMIL's late attention instability", "ABMIL + anchor + NSF (λ = 0.1)",
     "ABMIL", "late_jsd", "less", None, None, "", "Fig. 1, spec §4.3 S8 (λ)"),
    ("... more than a uniform target of the same weight (λ = 0.1) does", "ABMIL + anchor + NSF (λ = 0.1)",
     "ABMIL + uniform target (λ = 0.1)", "late_jsd", "less", None, None, "", "spec §4.3 S6, S8"),
    *[(f"At matched attention entropy, {a} moves less late in training than a uniform-target model",
       a, MATCHED_PREFIX + a, "log_late_jsd", "less", None, None, "log JSD ratio", "issue 12, spec §4.3 S6")
      for a in MATCHED_ANCHORS],
    ("... more than entropy maximisation (AEM) of the same weight does", "ABMIL + anchor + NSF",
     "ABMIL + AEM (β = 1)", "late_jsd", "less", None, None, "", "spec §3.1 (the released anchor acts like AEM)"),
    ("... more than the released frozen random anchor does", "ABMIL + anchor + NSF",
     "ABMIL + frozen random anchor", "late_jsd", "less", None, None, "", "spec §3.1"),
    ("The anchor + NSF raises ABMIL's macro-F1", "ABMIL + anchor + NSF", "ABMIL", "f1_macro", "greater",
     None, None, "", "Table 2 (up to +10.73 % on BRACS)"),
    ("The anchor + NSF raises ABMIL's AUC", "ABMIL + anchor + NSF", "ABMIL", "auc", "greater",
     None, None, "", "Table 2"),
    ("The anchor + NSF (1/N KL) raises ABMIL's macro-F1", "ABMIL + anchor + NSF (1/N KL)", "ABMIL", "f1_macro",
     "greater", None, None, "", "Table 2"),
    ("The anchor + NSF (1/N KL) raises ABMIL's AUC", "ABMIL + anchor + NSF (1/N KL)", "ABMIL", "auc", "greater",
     None, None, "", "Table 2"),
    ("The anchor + NSF (λ = 0.1) raises ABMIL's AUC", "ABMIL + anchor + NSF (λ = 0.1)", "ABMIL", "auc", "greater",
     None, None, "", "Table 2"),
    ("The anchor + NSF improves ABMIL's localization (instance AUROC of attention)", "ABMIL + anchor + NSF",
     "ABMIL", "instance_auroc", "greater", None, None, "", "Tables 13, 19 (ASMIL best FROC / Dice)"),
    ("The anchor + NSF lowers CLAM-SB's late attention instability (plug-in)", "CLAM-SB + anchor + NSF", "CLAM-SB",
     "late_jsd", "less", None, None, "", "Table 2, S3/S4"),
    ("The anchor + NSF raises CLAM-SB's AUC (plug-in)", "CLAM-SB + anchor + NSF", "CLAM-SB", "auc", "greater",
     None, None, "", "Table 2, S3/S4"),
    ("The anchor + NSF lowers DSMIL's late attention instability (plug-in)", "DSMIL + anchor + NSF", "DSMIL",
     "late_jsd", "less", None, None, "", "Table 2, S3/S4"),
    ("... more than a uniform target of the same weight does (DSMIL)", "DSMIL + anchor + NSF",
     "DSMIL + uniform target", "late_jsd", "less", None, None, "", "spec §4.3 S6"),
    ("The anchor + NSF raises DSMIL's AUC (plug-in)", "DSMIL + anchor + NSF", "DSMIL", "auc", "greater",
     None, None, "", "Table 2 (F1 drops for DSMIL + anchor on CAMELYON-16)"),
    ("The anchor lowers ASMIL's late attention instability", "ASMIL", "ASMIL without anchor", "late_jsd", "less",
     None, None, "", "Fig. 1, Table 3"),
    ("The anchor raises ASMIL's macro-F1", "ASMIL", "ASMIL without anchor", "f1_macro", "greater",
     0.784, 0.729, "F1 (BRACS)", "Table 12"),
    ("The anchor raises ASMIL's AUC", "ASMIL", "ASMIL without anchor", "auc", "greater",
     0.916, 0.866, "AUC (BRACS)", "Table 12"),
    ("NSF in the online model lowers macro-F1 (against a softmax online model, both with the NSF anchor)",
     "ABMIL + anchor + NSF, NSF online", "ABMIL + anchor + NSF", "f1_macro", "less", None, None, "",
     "Tables 4-7, S7 (online NSF loses more than 6 % F1 on BRACS)"),
]
S7_VARIANTS = ("ABMIL + entmax-1.5 anchor", "ABMIL + anchor + NSF, NSF online",
               "ABMIL + anchor + NSF, mixture online (Eq. 34)")
S7_REFERENCE = "ABMIL + anchor + NSF"  # softmax online, NSF anchor target: what each S7 variant changes one thing of


def _phases(per_slide: pd.DataFrame, method: str = "ABMIL") -> pd.DataFrame:
    """The two halves of one method's runs as two pseudo-methods (``PHASES``), matched on seed and slide."""
    base = per_slide[per_slide["method"] == method]
    return pd.concat([base.assign(method=PHASES[0], jsd=base["late_jsd"]),
                      base.assign(method=PHASES[1], jsd=base["early_jsd"])], ignore_index=True)


def _log_jsd(jsd: Any) -> Any:
    """log JSD, floored at 1e-12 (a run whose tracked attention never changed would give -inf)."""
    return np.log(np.maximum(jsd, 1e-12))


def matched_entropy_control(per_seed: pd.DataFrame, methods: Sequence[str] = MATCHED_ANCHORS,
                            family: Sequence[str] = UNIFORM_FAMILY) -> pd.DataFrame:
    """The matched-entropy control (issue 12: stabilisation only at matched attention entropy). Per seed, the
    uniform-target ``family`` (one run per KL weight, bare ABMIL as λ = 0) traces log late JSD against late
    entropy; for each of ``methods`` it is read, by linear interpolation between the family's points sorted by
    entropy, at that method's late entropy of the same seed: what a model regularised only towards flatter
    attention moves at the same flatness. Returns rows ``method`` (the method itself, and
    ``MATCHED_PREFIX + method`` for the control), ``seed``, ``late_entropy``, ``log_late_jsd`` and ``clamped``
    (the method's entropy lay outside the family's range at that seed, so the nearest end was used). Methods or
    family members that were not run are skipped; fewer than two family members give an empty frame."""
    frame = per_seed[["method", "seed", "late_entropy", "late_jsd"]].dropna()
    curve = frame[frame["method"].isin(family)]
    rows = []
    if curve["method"].nunique() < 2:
        return pd.DataFrame(columns=["method", "seed", "late_entropy", "log_late_jsd", "clamped"])
    for method in methods:
        for run in frame[frame["method"] == method].itertuples():
            points = curve[curve["seed"] == run.seed].sort_values("late_entropy")
            if len(points) < 2:
                continue
            x, y = points["late_entropy"].to_numpy(), _log_jsd(points["late_jsd"].to_numpy())
            clamped = not x[0] <= run.late_entropy <= x[-1]
            rows += [{"method": method, "seed": run.seed, "late_entropy": run.late_entropy,
                      "log_late_jsd": float(_log_jsd(run.late_jsd)), "clamped": False},
                     {"method": MATCHED_PREFIX + method, "seed": run.seed, "late_entropy": run.late_entropy,
                      "log_late_jsd": float(np.interp(run.late_entropy, x, y)), "clamped": clamped}]
    return pd.DataFrame(rows, columns=["method", "seed", "late_entropy", "log_late_jsd", "clamped"])


def dynamics_claims(result: Dynamics, methods: Sequence[str] | None = None, n_resamples: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """The claims table of notebook 20: AUC from per-slide test predictions, JSD from per-slide instability (both
    by hierarchical bootstrap over seeds, then slides), macro-F1 by the paired t over seeds. Rows whose methods
    were not run are left out. Late-JSD rows also carry ``entropy_a`` / ``entropy_b``, the two methods' mean late
    normalised entropy: a lower JSD is stabilisation only at matched entropy (flatter attention moves less). The
    ``log_late_jsd`` rows compare an anchor with the uniform-target family read at its own entropy, seed by seed
    (:func:`matched_entropy_control`; paired t over seeds; the difference is a log ratio of JSDs)."""
    methods = set(result.runs["method"]) if methods is None else set(methods)
    if "ABMIL" in methods:
        methods |= set(PHASES)
    per_seed = result.per_seed().rename(columns={"test_f1_macro": "f1_macro"})
    matched = matched_entropy_control(per_seed, [m for m in MATCHED_ANCHORS if m in methods])
    methods |= set(matched["method"])
    per_seed = pd.concat([per_seed, matched.loc[matched["method"].str.startswith(MATCHED_PREFIX),
                                                ["method", "seed", "log_late_jsd"]]], ignore_index=True)
    per_seed["log_late_jsd"] = per_seed["log_late_jsd"].fillna(_log_jsd(per_seed["late_jsd"]))
    claims = [Claim(s, a, b, m, d, pa, pb, u, source=src) for s, a, b, m, d, pa, pb, u, src in DYNAMICS_CLAIMS
              if a in methods and b in methods]
    if not claims:
        raise ValueError(f"dynamics_claims: none of the claims' method pairs were run (methods: {sorted(methods)})")
    per_slide = result.per_slide()
    predictions = {"auc": result.predictions, "late_jsd": per_slide, "jsd": _phases(per_slide)}
    metrics = {"late_jsd": _mean_of("late_jsd"), "jsd": _mean_of("jsd")}
    if not result.localization.empty:
        loc = result.localization.dropna(subset=["instance_auroc"])
        predictions["instance_auroc"] = loc[["method", "seed", "slide_id", "instance_auroc"]]
        metrics["instance_auroc"] = _mean_of("instance_auroc")
    table = claims_table(claims, predictions=predictions, per_seed=per_seed, n_resamples=n_resamples, seed=seed,
                         metrics=metrics)
    entropy = per_slide.groupby("method")["late_entropy"].mean()
    entropy = pd.concat([entropy, pd.Series({MATCHED_PREFIX + m: entropy[m] for m in MATCHED_ANCHORS
                                             if m in entropy})])
    is_jsd = table["metric"].isin(["late_jsd", "log_late_jsd"])
    for side, column in (("a", "method_a"), ("b", "method_b")):
        table[f"entropy_{side}"] = np.where(is_jsd, table[column].map(entropy), np.nan)
    return table


def s7_table(result: Dynamics) -> pd.DataFrame:
    """S7 (alternatives to NSF; spec §4.3): per S7 variant that ran and its reference (:data:`S7_REFERENCE`), mean
    ± sd over seeds (ddof=1) of test macro-F1 and AUC, late JSD and entropy, training time per epoch and its ratio
    to the reference's (paper: entmax +33 %), and the learnt Eq. 34 mixture weight alpha (paper: 0.989-0.996)."""
    from milstudy.papers.grids import mean_std

    names = [n for n in (S7_REFERENCE, *S7_VARIANTS) if n in set(result.runs["method"])]
    if len(names) < 2 or names[0] != S7_REFERENCE:
        raise ValueError(f"s7_table: needs {S7_REFERENCE!r} and at least one of {list(S7_VARIANTS)}; ran "
                         f"{sorted(set(result.runs['method']))}")
    frame = result.per_seed()
    frame = frame[frame["method"].isin(names)].copy()
    if "mixture_alpha" not in frame:
        frame["mixture_alpha"] = np.nan
    reference = frame[frame["method"] == S7_REFERENCE].set_index("seed")["train_s_per_epoch"]
    frame["time_vs_reference"] = frame["train_s_per_epoch"] / frame["seed"].map(reference)
    table = mean_std(frame, "method", ["test_f1_macro", "test_auc", "late_jsd", "late_entropy", "train_s_per_epoch",
                                       "time_vs_reference", "mixture_alpha"])
    table.loc[table["mixture_alpha_mean"].isna(), "mixture_alpha"] = ""
    return table.set_index("method").loc[names].reset_index()


def attention_logits_of(model: Any, bags: Sequence[Any]) -> dict[str, np.ndarray]:
    """Eval-mode ``attention_logits`` ``{slide_id: [heads, N]}`` of a trained model on ``bags`` (one at a time)."""
    import torch

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    out = {}
    try:
        with torch.no_grad():
            for bag in bags:
                x = bag.features.to(param.device, param.dtype)[None]
                coords = None if bag.coords is None else bag.coords.to(param.device)[None]
                logits = model(x, coords=coords).attention_logits
                if logits is None:
                    raise ValueError(f"{type(model).__name__} returns no attention_logits")
                out[str(bag.slide_id)] = logits[0].double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def trained_targets(data: AsmilData, seeds: Sequence[int], temperatures: Sequence[float], epochs: int = 10,
                    lr: float = 2e-4) -> pd.DataFrame:
    """Notebook 21 (S2 on trained logits): per seed, ABMIL trained on ``data`` (selection on validation), its
    attention logits on the test bags turned into NSF and softmax targets at each temperature
    (:func:`milstudy.analysis.nsf_theory.target_concentration`); rows carry ``seed``, ``method`` ("NSF T=1") and
    ``log_top_ratio`` for the claims table."""
    from milstudy.analysis.nsf_theory import target_concentration
    from milstudy.data.bags import BagListDataset
    from milstudy.models import build_model
    from milstudy.train.optim import seed_everything
    from milstudy.train.two_stage import TrainConfig, train_two_stage

    rows = []
    in_dim = int(data.bags["train"][0].features.shape[-1])
    for s in seeds:
        seed_everything(s)
        model = build_model("abmil", in_dim, data.task.n_out)
        train_two_stage(model, data.task, BagListDataset(data.bags["train"]), BagListDataset(data.bags["val"]),
                        None, TrainConfig(epochs=epochs, lr=lr, device="cpu", seed=s, quiet=True))
        rows.append(target_concentration(attention_logits_of(model, data.bags["test"]), temperatures).assign(seed=s))
    targets = pd.concat(rows, ignore_index=True)
    targets["method"] = targets["target"] + " T=" + targets["temperature"].map("{:g}".format)
    targets["log_top_ratio"] = np.log(targets["top_ratio"])
    return targets
