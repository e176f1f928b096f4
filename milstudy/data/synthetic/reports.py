"""Templated pathology reports for synthetic slides (slide-report pairs of DRE-SLCL, specs/dre_slcl.md §4.0).

A report is built from the slide's latent attributes (organ, tumour yes/no, subtype, grade / Gleason patterns,
tumour burden, number and size of foci) with synonym swaps, field dropout and distractor sentences, so that text
and image share information without the text being a copy of the label. Some slides get no report (empty string).
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_report"]

_DISTRACTORS = (
    "Specimen received in formalin, labelled with the patient's name.",
    "Sections are submitted in their entirety.",
    "Margins are reported separately.",
    "Clinical history: screening finding.",
    "Immunohistochemistry to follow in an addendum.",
    "The slides were reviewed at the departmental consensus meeting.",
    "Fixation time within recommended limits.",
)
_NEGATIVE = ("No evidence of malignancy.", "Negative for carcinoma.", "No tumour identified.", "Benign tissue only.")
_SUBTYPES = {
    0: ("invasive ductal carcinoma", "invasive carcinoma of no special type", "ductal carcinoma, invasive"),
    1: ("invasive lobular carcinoma", "lobular carcinoma, invasive", "carcinoma with lobular features"),
}
_ARCH_WORDS = {
    "glands": ("forming glands", "with tubule formation", "in glandular structures"),
    "clusters": ("in cohesive nests", "in solid clusters", "forming cribriform nests"),
    "single_file": ("in single-file cords", "infiltrating in single files", "as discohesive linear cords"),
}
_ISUP_PATTERNS = {1: "3+3=6", 2: "3+4=7", 3: "4+3=7", 4: "4+4=8", 5: "4+5=9"}


def make_report(attrs: dict, rng: np.random.Generator, field_keep: float = 0.8) -> str:
    """One report from ``attrs`` (keys: organ, has_tumour, subtype, grade, primary_pattern, secondary_pattern,
    witness_rate, n_foci, largest_focus_mm, architectures)."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    sentences: list[str] = []
    organ = attrs.get("organ", "breast")
    sentences.append(pick((f"{organ.capitalize()}, biopsy:", f"Specimen: {organ}.", f"Site: {organ}.")))
    if not attrs["has_tumour"]:
        sentences.append(pick(_NEGATIVE))
    else:
        if organ == "prostate":
            grade = int(attrs["grade"])
            p, s = attrs.get("primary_pattern"), attrs.get("secondary_pattern")
            gleason = f"{p}+{s}={p + s}" if p and s else _ISUP_PATTERNS.get(grade, "")
            sentences.append(pick(("Prostatic adenocarcinoma", "Acinar adenocarcinoma of the prostate")) + ".")
            if rng.uniform() < field_keep:
                sentences.append(pick((f"Gleason score {gleason}.", f"Gleason {gleason}.")))
            if rng.uniform() < field_keep:
                sentences.append(pick((f"Grade group {grade}.", f"ISUP grade {grade}.")))
        elif organ == "lymph node":
            sentences.append(pick(("Metastatic carcinoma identified.", "Positive for metastatic carcinoma.",
                                   "Lymph node with metastatic deposits.")))
        else:
            subtype = int(attrs.get("subtype", 0))
            sentences.append(pick(_SUBTYPES.get(subtype, _SUBTYPES[0])).capitalize() + ".")
        archs = [a for a in str(attrs.get("architectures", "")).split(",") if a]
        if archs and rng.uniform() < field_keep:
            sentences.append("Tumour cells arranged " + pick(_ARCH_WORDS[archs[0]]) + ".")
        if rng.uniform() < field_keep:
            pct = max(1, int(round(100 * float(attrs["witness_rate"]))))
            sentences.append(pick((f"Tumour occupies approximately {pct}% of the tissue.",
                                   f"Tumour cellularity about {pct} percent.", f"Estimated tumour burden {pct}%.")))
        n_foci = int(attrs.get("n_foci", 1))
        if rng.uniform() < field_keep:
            sentences.append("Multifocal disease (%d foci)." % n_foci if n_foci > 1 else pick(("Unifocal.", "Single focus.")))
        if rng.uniform() < field_keep and attrs.get("largest_focus_mm"):
            sentences.append(f"Largest focus measures {float(attrs['largest_focus_mm']):.1f} mm.")
    for _ in range(int(rng.integers(0, 3))):
        sentences.insert(int(rng.integers(1, len(sentences) + 1)), pick(_DISTRACTORS))
    return " ".join(sentences)
