"""The E2E collapse phase diagram (specs/abmilx.md §4.3 E2, synthetic profile; ours, not in the paper).

Question: does end-to-end training collapse (end at chance) when the tumour evidence is rare? Two knobs set
that: the witness rate w of positive slides (share of tumour patches) and s, the patches the aggregator sees per
slide and training step (random sampling). A positive slide whose s-sample holds no tumour patch is a mislabelled
bag for that step, with probability P0(N, T, s) of :mod:`milstudy.analysis.sampling_noise`; at evaluation every
patch is seen, so a large N also dilutes dense pooling. The grid trains each aggregator over w x s x seeds on an
in-memory cohort with instance ground truth (:func:`milstudy.data.e2e_slides.toy_slides`: grey-noise patches, witnesses
tinted red with a tunable ``contrast``) and records the test AUC, whether it is at chance, and where the attention
went (mass on tumour patches of the positive test slides).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def summarize_collapse(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (aggregator, witness_rate, s): test AUC mean and sample sd (ddof=1) over seeds, the fraction of seeds at chance,
    mean attention mass on tumour patches, P0, and the number of seeds."""
    keys = ["aggregator", "witness_rate", "s"]
    grouped = frame.groupby(keys, sort=False)
    out = grouped.agg(
        n_tumour=("n_tumour", "first"),
        test_auc_mean=("test_auc", "mean"),
        test_auc_std=("test_auc", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
        collapsed_fraction=("collapsed", "mean"),
        witness_mass=("witness_mass", "mean"),
        p_no_witness=("p_no_witness", "first"),
        seeds=("seed", "nunique"),
    )
    return out.reset_index()
