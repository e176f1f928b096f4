"""One module per paper: its settings, reference numbers, claims and experiment grids, built from the layers
below (data, models, train, analysis); the notebooks call these. ``grids`` holds the study helpers all papers share.

- ``abmilx``: ABMILX + MRIS (Tang, Qin et al., NeurIPS 2025) settings, tables, Table 7 grid, profile data;
  ``abmilx_study``: its tracked E2E runs and two-stage arms; ``abmilx_collapse``: the E2 collapse phase diagram.
- ``svec``: the S-vec tier's calibrated, frozen descriptor worlds and its E2E setting (``svec_cli``: ``milstudy
  calibrate``).
"""
