"""The model zoo: every aggregator behind ``build_model`` (see ``milstudy.models.base``).

Importing this package registers every model family (one module per paper):
pooling (mean, max), abmil (Ilse et al. 2018), clam (CLAM-SB), dsmil, transmil, abmilx (spec abmilx.md),
transformer_mil (ViTMIL, QAMIL of the ABMILX paper's Table 5).
Models whose auxiliary losses need the bag label have ``needs_targets = True`` and accept ``targets=``.
"""

from milstudy.models.base import (
    MILModel,
    MILOutput,
    build_model,
    combined_loss,
    list_models,
    register_model,
    register_preset,
)
from milstudy.models.layers import PAD_LOGIT, masked_softmax
from milstudy.models import abmil, abmilx, clam, dsmil, pooling, transformer_mil, transmil  # noqa: F401,E402  (registration)
from milstudy.models import asmil  # noqa: F401,E402  (registration; after the bases it wraps)

__all__ = [
    "PAD_LOGIT",
    "MILModel",
    "MILOutput",
    "build_model",
    "combined_loss",
    "list_models",
    "masked_softmax",
    "register_model",
    "register_preset",
]
