"""Synthetic whole-slide cohorts with instance-level ground truth (the embedded default data of milstudy).

``renderer`` paints H&E-like slides, ``reports`` writes their pathology reports, ``ground_truth`` reads label maps
into per-patch tumour labels, ``cohort`` builds, caches and
loads cohorts (pyramidal TIFFs + masks + manifest). See :mod:`milstudy.data.synthetic.cohort` for the sizes.
``descriptors`` draws the cheap S-vec tier (descriptor "patches", thousands per slide, in memory).
"""

from milstudy.data.synthetic.cohort import (
    PROFILES,
    TASKS,
    TUMOUR_LABEL,
    Cohort,
    SyntheticCohortConfig,
    build_cohort,
    cohort_dir,
    cohort_for_profile,
    instance_labels,
    load_cohort,
    read_tumour_mask,
)
from milstudy.data.synthetic.descriptors import DescriptorCohort, DescriptorWorld, descriptor_cohort
from milstudy.data.synthetic.renderer import ARCHITECTURES, FocusSpec, render_slide

__all__ = [
    "ARCHITECTURES",
    "PROFILES",
    "TASKS",
    "TUMOUR_LABEL",
    "Cohort",
    "DescriptorCohort",
    "DescriptorWorld",
    "FocusSpec",
    "SyntheticCohortConfig",
    "build_cohort",
    "cohort_dir",
    "cohort_for_profile",
    "descriptor_cohort",
    "instance_labels",
    "load_cohort",
    "read_tumour_mask",
    "render_slide",
]
