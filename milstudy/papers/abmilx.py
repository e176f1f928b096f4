"""The ABMILX paper's own material (Tang, Qin et al., *Revisiting End-to-End Learning with Slide-level Supervision
in Computational Pathology*, NeurIPS 2025; specs/abmilx.md): reference numbers of its tables, its E2E settings
(spec §5.3), the CPU profiles' sizes, the Table 7 ablation grid, the E2 aggregator names and the data of each
notebook profile. The study runs that use them are in ``milstudy.papers.abmilx_study``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from milstudy.data.e2e_slides import E2ESlide, load_data
from milstudy.train.e2e import E2EConfig
from milstudy.train.tasks import Task

log = logging.getLogger("milstudy.papers.abmilx")


# Sec. 3.3 table of the paper (spec §4.3 E1): sparsity on CAMELYON (%), BRCA subtyping AUC, BRCA survival C-index.
PAPER_E1 = pd.DataFrame(
    [("ABMIL", 80, 89.23, 62.70), ("TransMIL", 13, 91.44, 63.42), ("MHLA", 61, 91.58, 63.80),
     ("MHLA&A+ (α=1)", 29, 92.84, 65.49), ("MHLA&A+ (learnable α)", 36, 93.97, 67.78)],
    columns=["model", "paper_sparsity", "paper_sub_auc", "paper_surv_cindex"],
)

# Table 6 of the paper, CAMELYON column (AUC, %), spec §4.3 E5.
PAPER_E5_CAMELYON = pd.DataFrame(
    [("E2E R18 + ABMILX", 95.88), ("E2E R50 + ABMILX", 96.06), ("UNI (FM) + ABMIL, two-stage", 96.58),
     ("ImageNet R50 + ABMIL, two-stage", 91.84)],
    columns=["setting", "paper_camelyon_auc"],
)


def e1_aggregators(width: int = 64, heads: int = 4) -> dict[str, tuple[str, dict]]:
    """The five E1 aggregators as ``{label: (registry name, kwargs)}`` at a common width (CPU: 64, 4 heads); ABMIL
    in the upstream layout the paper trains end to end (spec §2.5: LN, GELU, dropout 0.25, no biases, LN before the
    classifier; issue 9), at the common width."""
    return {
        "ABMIL": ("abmil_upstream", {"hidden_dim": width, "attention_dim": max(16, width // 2)}),
        "TransMIL": ("transmil", {"dim": width, "heads": heads, "landmarks": max(8, width // 2)}),
        "MHLA": ("mhla", {"dim": width, "heads": heads}),
        "MHLA&A+ (α=1)": ("abmilx_alpha1", {"dim": width, "heads": heads}),
        "MHLA&A+ (learnable α)": ("abmilx", {"dim": width, "heads": heads}),
    }



# Paper reference numbers (specs/abmilx.md §4.3 E2/E3, §5.3 Table 7): Grad. (PANDA acc) / Sub. (BRCA AUC) / Surv.
REFERENCE_E2 = pd.DataFrame(
    [("ABMIL", 75.46, 89.23, 62.70), ("DSMIL", 76.28, 91.09, 64.32), ("TransMIL", 75.08, 91.44, 63.42),
     ("RRTMIL", 17.99, 61.82, 53.42), ("QAMIL", 75.12, 90.65, 64.29), ("ViTMIL", 76.98, 92.61, 63.67),
     ("ABMILX", 78.34, 93.97, 67.78), ("Best FM, two-stage", 74.97, 94.84, 67.30)],
    columns=["aggregator", "paper_grad", "paper_sub", "paper_surv"],
)
REFERENCE_E3 = pd.DataFrame(
    [("attention sampling", 77.43, 93.14, 66.53, 68.0), ("single-scale random", 76.77, 92.72, 67.24, None),
     ("MRIS (r=4)", 78.34, 93.97, 67.78, 9.0)],
    columns=["sampler", "paper_grad", "paper_sub", "paper_surv", "paper_hours"],
)
REFERENCE_TABLE7 = pd.DataFrame(
    [("ffn", "without", 77.04, 93.97, 67.78), ("ffn", "with", 78.34, 93.03, 65.23),
     ("dim", "128", 76.22, 91.50, 62.64), ("dim", "256", 76.15, 93.97, 67.78), ("dim", "384", 76.01, 90.21, 64.13),
     ("dim", "512", 78.34, 91.51, 63.20),
     ("heads", "1", 73.74, 90.12, 63.57), ("heads", "2", 77.32, 90.91, 65.61), ("heads", "4", 78.34, 91.65, 62.83),
     ("heads", "8", 76.48, 93.97, 67.78), ("heads", "16", 76.50, 92.59, 64.62),
     ("ratio", "inf", 76.77, 92.72, 67.24), ("ratio", "2", 74.02, 92.74, 64.92), ("ratio", "4", 78.34, 93.97, 66.22),
     ("ratio", "6", 77.21, 92.35, 67.46), ("ratio", "10", 76.09, 92.25, 67.78),
     ("s", "64", 76.22, 93.07, 63.52), ("s", "128", 78.34, 93.86, 63.73), ("s", "384", 74.32, 92.52, 64.12),
     ("s", "512", 75.62, 93.97, 65.59), ("s", "768", None, 93.66, 67.78), ("s", "1280", None, 92.23, 65.77),
     ("sampler", "random", 78.34, 93.97, 67.78), ("sampler", "regional 2", 76.52, 93.26, 67.28),
     ("sampler", "regional 4", 76.11, 92.67, 67.23), ("sampler", "regional 8", None, 92.14, 67.00)],
    columns=["ablation", "setting", "paper_grad", "paper_sub", "paper_surv"],
)

# Paper-profile E2E settings (specs/abmilx.md §5.3, R18 columns): data spec + E2EConfig overrides per task.
PAPER_SETTINGS = {
    "brca_subtyping": dict(
        data={"manifest": "data_manifests/tcga_brca_subtyping.csv", "main_mpp": 1.0, "patch_size": 256,
              "task": {"type": "classification"}},
        config=dict(encoder="resnet18_trunc", encoder_init="pretrained", optimizer="adamw", lr=8e-5, weight_decay=0.0, epochs=75,
                    warmup_epochs=10, patience=10, min_epochs=50, batch_slides=3, s=512, ratio=4, crop_size=224,
                    rrc_scale_min=0.25, hflip=False, vflip=False, ema_decay=0.9997,
                    aggregator_kwargs={"dim": 256, "heads": 8, "ffn": False})),
    "brca_survival": dict(
        data={"manifest": "data_manifests/tcga_brca_survival.csv", "main_mpp": 1.0, "patch_size": 256,
              "target": ["survival_months", "event"], "task": {"type": "survival", "n_bins": 4}, "by_case": True,
              "fold": 0},
        config=dict(encoder="resnet18_trunc", encoder_init="pretrained", optimizer="adamw", lr=8e-5, weight_decay=5e-2, epochs=30,
                    warmup_epochs=5, patience=10, min_epochs=20, batch_slides=2, s=768, ratio=10, crop_size=224,
                    rrc_scale_min=0.08, hflip=False, vflip=False, ema_decay=None,
                    aggregator_kwargs={"dim": 256, "heads": 8, "ffn": False, "attention_bias": True})),
    "panda": dict(
        data={"manifest": "data_manifests/panda.csv", "main_mpp": 0.25, "patch_size": 256,
              "task": {"type": "grading", "n_grades": 6}},
        config=dict(encoder="resnet18_trunc", encoder_init="pretrained", optimizer="adam", lr=2e-4, weight_decay=1e-5, epochs=200,
                    warmup_epochs=0, patience=20, min_epochs=120, batch_slides=8, s=128, ratio=4, crop_size=224,
                    rrc_scale_min=0.08, hflip=True, vflip=True, ema_decay=0.9999,
                    aggregator_kwargs={"dim": 512, "heads": 4, "ffn": True})),
}


# Synthetic cohort of the ``cpu`` profile of the E2E study notebooks (11, 12): 2048-px slides (about 100-160 main-
# scale patches, so s = 16-32 is a real sample of the bag and the samplers differ), witness rate down to 1 % (so
# not every aggregator saturates at AUC 1), 100 slides (60 / 20 / 20 train / val / test).
CPU_COHORT = dict(n_slides=100, size_range=(2048, 2048), witness_rate_range=(0.01, 0.3))

# Matched capacity (spec §5.5; the study standard "compare methods at matched capacity"): every aggregator of one
# comparison gets the same width (and, where it has heads, the same head count): profile S (smoke, cpu) D = 64,
# m = 4; the paper profile D = 256, m = 8 (the BRCA settings' ABMILX). The width argument differs per model.
WIDTH_ARGUMENT = {name: "dim" for name in ("abmilx", "mhla", "abmilx_alpha1", "transmil", "vitmil", "qamil",
                                           "rrtmil")}
WIDTH_ARGUMENT.update({name: "hidden_dim" for name in ("abmil", "abmil_gated", "abmil_upstream", "mean_pooling",
                                                       "max_pooling")})
# RRTMIL: ``heads`` is its R-MSA's head count; its CR-MSA keeps upstream's 8 heads (crmsa_heads, not tied to it).
HEADS_ARGUMENT = {name: "heads" for name in ("abmilx", "mhla", "abmilx_alpha1", "transmil", "vitmil", "qamil",
                                             "rrtmil")}
PROFILE_WIDTH = {"smoke": (64, 4), "cpu": (64, 4), "paper": (256, 8)}


def aggregator_kwargs(name: str, profile: str, width: int | None = None, heads: int | None = None) -> dict:
    """Constructor arguments of zoo model ``name`` at the profile's matched width and head count (``width`` /
    ``heads`` override them); models without a width argument (DSMIL: identity values on the encoder features)
    get {}."""
    if profile not in PROFILE_WIDTH:
        raise ValueError(f"profile must be one of {sorted(PROFILE_WIDTH)}, got {profile!r}")
    default_width, default_heads = PROFILE_WIDTH[profile]
    out: dict[str, Any] = {}
    if name in WIDTH_ARGUMENT:
        out[WIDTH_ARGUMENT[name]] = int(width or default_width)
    if name in HEADS_ARGUMENT:
        out[HEADS_ARGUMENT[name]] = int(heads or default_heads)
    return out


def profile_data(profile: str, task: str = "detection", seed: int = 0, n_slides: int | None = None,
                 paper_setting: str = "brca_subtyping") -> tuple[dict[str, list[E2ESlide]], Task, dict]:
    """Slides per split, the task and E2EConfig overrides for a notebook profile.

    smoke: the smoke synthetic cohort (12 slides of 1024 px, about 25-40 patches each; ``n_slides`` changes the
    count); cpu: ``CPU_COHORT`` (``n_slides`` slides of 2048 px, default 100, about 100-160 patches each) so a grid
    of E2E runs fits in minutes on 2 cores; paper: ``PAPER_SETTINGS[paper_setting]`` from data_manifests/ and
    MILSTUDY_SLIDE_ROOT (fails early with a clear message when it is not set). Grids and patch banks are cached.
    """
    from milstudy.paths import REPO_ROOT, slide_root

    if profile == "paper":
        root = slide_root()
        if root is None:
            raise RuntimeError("the paper profile needs the real slides: set MILSTUDY_SLIDE_ROOT to the folder that "
                               "holds the TCGA/PANDA slides listed in data_manifests/ (see README)")
        setting = PAPER_SETTINGS[paper_setting]
        spec = {**setting["data"], "manifest": str(REPO_ROOT / setting["data"]["manifest"]), "slide_root": str(root)}
        data, fitted = load_data(spec, seed=seed, load_banks=False)
        return data, fitted, dict(setting["config"], patch_cache=False)
    cohort: dict[str, Any] = {"profile": "smoke", "task": task}
    if profile == "cpu":
        cohort.update(CPU_COHORT)
    elif profile != "smoke":
        raise ValueError(f"profile must be smoke, cpu or paper, got {profile!r}")
    if n_slides:
        cohort["n_slides"] = int(n_slides)
    data, fitted = load_data({"cohort": cohort}, seed=seed)
    return data, fitted, {"aggregator_kwargs": aggregator_kwargs("abmilx", profile)}


def table7_configs(base: E2EConfig, ablations: Sequence[str] = ("ffn", "dim", "heads", "ratio", "s", "sampler"),
                   s_values: Sequence[int] | None = None, dims: Sequence[int] | None = None) -> dict[str, E2EConfig]:
    """The Table 7 grid around ``base`` (an ABMILX config): ``{"<ablation>: <setting>": config}``.

    Settings follow the paper (FFN without/with; D 128-512; m 1-16; r inf/2/4/6/10; s 64-1280; random vs regional
    2/4/8); ``s_values`` / ``dims`` replace the paper's s and D values for CPU-sized runs (D defaults to the paper's
    values when ``base`` uses D >= 128, else to 16/32/64/128).
    """
    kw = dict(base.aggregator_kwargs)
    kw.setdefault("ffn", False)  # explicit, so every ablation's default setting is the same config as ``base``
    base = replace(base, aggregator_kwargs=kw)
    dim = int(kw.get("dim", 64))
    grid: dict[str, E2EConfig] = {}
    for name in ablations:
        if name == "ffn":
            for label, flag in (("without", False), ("with", True)):
                grid[f"ffn: {label}"] = replace(base, aggregator_kwargs={**kw, "ffn": flag})
        elif name == "dim":
            for value in dims or ((128, 256, 384, 512) if dim >= 128 else (16, 32, 64, 128)):
                grid[f"dim: {value}"] = replace(base, aggregator_kwargs={**kw, "dim": value})
        elif name == "heads":
            for value in (1, 2, 4, 8, 16):
                if dim % value == 0:
                    grid[f"heads: {value}"] = replace(base, aggregator_kwargs={**kw, "heads": value})
        elif name == "ratio":
            for value in ("inf", 2, 4, 6, 10):
                grid[f"ratio: {value}"] = replace(base, sampler="mris", ratio=float(value))
        elif name == "s":
            for value in s_values or (64, 128, 384, 512, 768, 1280):
                grid[f"s: {value}"] = replace(base, s=int(value))
        elif name == "sampler":
            grid["sampler: random"] = replace(base, sampler="mris")
            for g in (2, 4, 8):
                grid[f"sampler: regional {g}"] = replace(base, sampler="regional", regions=g)
        else:
            raise ValueError(f"unknown Table 7 ablation {name!r}; choose from ffn, dim, heads, ratio, s, sampler")
    return grid


# Table 7's claims as pairs of settings (A beats B in the paper's column); the paper's defaults per column differ
# (spec §5.3), so each claim names the pair it compares.
TABLE7_CLAIMS = (
    ("ratio", "4", "inf", "multi-scale sampling (r = 4) beats single-scale (r = inf)"),
    ("heads", "4", "1", "multi-head attention (m = 4) beats one head"),
    ("ffn", "without", "with", "ABMILX without the FFN scores at least as high as with it"),
)


def table7_claims(run_names: Sequence[str], metric: str, column: str = "paper_sub") -> list:
    """``Claim`` rows of ``TABLE7_CLAIMS`` whose two settings were run (names ``"<ablation>: <setting>"``), with
    the paper's numbers from ``REFERENCE_TABLE7[column]`` (paper_grad | paper_sub | paper_surv)."""
    from milstudy.analysis.claims import Claim

    reference = REFERENCE_TABLE7.set_index(["ablation", "setting"])[column]
    units = {"paper_grad": "PANDA accuracy, %", "paper_sub": "BRCA-sub AUC, %", "paper_surv": "BRCA-surv C-index, %"}
    claims = []
    for ablation, a, b, text in TABLE7_CLAIMS:
        name_a, name_b = f"{ablation}: {a}", f"{ablation}: {b}"
        if name_a in run_names and name_b in run_names:
            claims.append(Claim(text, name_a, name_b, metric, "greater", reference.get((ablation, a)),
                                reference.get((ablation, b)), units[column], source="Table 7"))
    return claims


# The E2 aggregators by the names the paper's tables use (notebooks 11 and 14).
# ABMIL in its upstream layout (spec §2.5: LN, dropout 0.25, LN before the classifier), as the paper trains it E2E.
# RRTMIL in its upstream layout (spec §2.5; milstudy.models.rrtmil): with its 8 regions per side a bag of s <= 64
# sampled instances has one-token regions (R-MSA per token, CR-MSA adds nothing); the paper's s = 128-768 does not.
AGGREGATOR_NAMES = {"ABMIL": "abmil_upstream", "DSMIL": "dsmil", "TransMIL": "transmil", "RRTMIL": "rrtmil",
                    "QAMIL": "qamil", "ViTMIL": "vitmil", "ABMILX": "abmilx", "Mean pooling": "mean_pooling"}


def available_aggregators(wanted: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """``{label: model name}`` restricted to names registered in the zoo (missing ones are reported, not fatal).

    ``wanted``: ``{label: model name}``, or labels of ``AGGREGATOR_NAMES`` (an unknown label is an error).
    """
    from milstudy.models import list_models

    if not isinstance(wanted, Mapping):
        unknown = [label for label in wanted if label not in AGGREGATOR_NAMES]
        if unknown:
            raise ValueError(f"unknown aggregator label(s) {unknown}; known: {list(AGGREGATOR_NAMES)}")
        wanted = {label: AGGREGATOR_NAMES[label] for label in wanted}
    known = set(list_models())
    missing = [f"{label} ({name})" for label, name in wanted.items() if name not in known]
    if missing:
        log.warning("not in the model zoo, left out: %s", ", ".join(missing))
    return {label: name for label, name in wanted.items() if name in known}


def e1_table(summary: pd.DataFrame, metric: str = "test_auc") -> pd.DataFrame:
    """Our sparsity and detection AUC (mean ± std over seeds) beside the paper's Sec. 3.3 table."""
    ours = summary[["run", "sparsity_all", "sparsity_pos", metric, "gini", "normalized_entropy", "instance_auroc"]]
    ours = ours.rename(columns={"run": "model", "sparsity_all": "our_sparsity_all", "sparsity_pos": "our_sparsity_pos",
                                metric: f"our_{metric}"})
    return PAPER_E1.merge(ours, on="model", how="right")


def _lambda_share(frame: pd.DataFrame) -> pd.DataFrame:
    from milstudy.analysis.modulation import lambda_share

    return lambda_share(frame)


E1_CLAIMS = (  # (statement, A, B, column, direction, paper A, paper B, paper units)
    ("ABMIL is sparser than ABMILX (learnable α)", "ABMIL", "MHLA&A+ (learnable α)", "sparsity_all", "greater", 80,
     36, "sparsity, %"),
    ("ABMIL is sparser than MHLA", "ABMIL", "MHLA", "sparsity_all", "greater", 80, 61, "sparsity, %"),
    ("A+ lowers the sparsity of MHLA (α=1)", "MHLA&A+ (α=1)", "MHLA", "sparsity_all", "less", 29, 61, "sparsity, %"),
    ("TransMIL is less sparse than ABMIL", "TransMIL", "ABMIL", "sparsity_all", "less", 13, 80, "sparsity, %"),
    ("ABMILX (learnable α) beats ABMIL", "MHLA&A+ (learnable α)", "ABMIL", "test_auc", "greater", 93.97, 89.23,
     "BRCA-sub AUC, %"),
    ("ABMILX (learnable α) beats MHLA", "MHLA&A+ (learnable α)", "MHLA", "test_auc", "greater", 93.97, 91.58,
     "BRCA-sub AUC, %"),
    ("ABMILX (learnable α) beats TransMIL", "MHLA&A+ (learnable α)", "TransMIL", "test_auc", "greater", 93.97, 91.44,
     "BRCA-sub AUC, %"),
    ("multi-head lowers the risk: R_MH(MHLA) < R_MH(ABMIL) (Eq. 10)", "MHLA", "ABMIL", "risk_mh", "less", None, None,
     ""),
    ("A+ lowers the risk: R(ABMILX) < R(MHLA) (Eq. 15)", "MHLA&A+ (learnable α)", "MHLA", "risk", "less", None, None,
     ""),
    ("ABMILX puts more attention mass on tumour than ABMIL", "MHLA&A+ (learnable α)", "ABMIL", "mass_on_tumour",
     "greater", None, None, ""),
)


def e1_claims(per_seed: pd.DataFrame, metric: str = "test_auc", **table_kwargs: Any) -> pd.DataFrame:
    """The paper's E1/E6 statements (``E1_CLAIMS``) as a claims table (paired on seeds: t-intervals, Holm) from
    ``per_seed``: one row per (``run``, ``seed``) with the test metric and the per-slide analysis means
    (:func:`milstudy.papers.abmilx_study.per_seed_slide_means` merged with the run metrics). Claims whose runs or
    columns are missing are left out; ``metric`` replaces "test_auc" (e.g. another task's primary metric)."""
    from milstudy.analysis.claims import Claim, claims_table

    frame = per_seed.rename(columns={"run": "method"})
    present = set(frame["method"])
    claims = []
    for text, a, b, column, direction, paper_a, paper_b, units in E1_CLAIMS:
        column = metric if column == "test_auc" else column
        if a in present and b in present and column in frame and frame[column].notna().any():
            source = "Sec. 3.3" if "sparsity" in column or column == metric else "App. A"
            claims.append(Claim(text, a, b, column, direction, paper_a, paper_b, units, source=source))
    return claims_table(claims, per_seed=frame, **table_kwargs)


def lambda_le_1_share(final_modulation: pd.DataFrame | None, run: str = "MHLA&A+ (learnable α)") -> str | None:
    """One line on App. A's Λ ≤ 1 statement (Eqs. 17-29): the share of (slide, head) pairs of ``run`` with Λ ≤ 1
    (descriptive: a share of pairs pooled over seeds, not a paired comparison); None without modulation data."""
    if final_modulation is None or final_modulation.empty or "run" not in final_modulation:
        return None
    share = _lambda_share(final_modulation[final_modulation["run"] == run])
    if not len(share):
        return None
    row = share[share["alpha_sign"] == "all"].iloc[0]
    return (f"Λ ≤ 1 (App. A, Eqs. 17-29: claimed when within-class U dominates) for {row['share_lambda_le_1']:.2f} "
            f"of {int(row['pairs'])} (slide, head) pairs of {run}")


