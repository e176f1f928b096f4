"""Analyses of trained MIL models: functions on numpy/torch arrays (shapes in the docstrings). Nothing here trains;
a few read a given model out in eval mode (``tracking`` snapshots, ``modulation``'s Λ) without changing it.

- ``sparsity``: the ABMILX paper's "proportion of activated patches" (our threshold) + entropy, Gini, top-k mass.
- ``risk``: optimisation risk of App. A (R, R_MH, mass on tumour, top-1-is-noise rate, head correlation).
- ``modulation``: the modulation factor Λ of Eq. 17 and the identity itself.
- ``localization``: instance AUROC and top-k precision of attention against patch labels.
- ``embedding``: UMAP of instance features, silhouette and kNN purity.
- ``sampling_noise``: P(no tumour patch among s sampled), closed form vs measured.
- ``collapse``: summary of the E2E collapse phase diagram (the runs are ``milstudy.papers.abmilx_collapse``).
- ``tracking``: per-epoch attention snapshots of fixed slides and the tidy tables built from them.
- ``stats``: seed summaries (t-intervals, ddof=1), paired hierarchical-bootstrap differences over seeds and test
  slides, paired t, sign-flip test (>= 6 seeds), Holm, minimum detectable effect.
- ``claims``: ``Claim`` and ``claims_table`` (difference, interval, Holm-widened verdict interval, verdict), ``save_claims``.
"""
