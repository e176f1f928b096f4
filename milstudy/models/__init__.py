"""The model zoo: every aggregator behind ``build_model`` (see ``milstudy.models.base``).

Importing this package registers every model family (one module per paper):
pooling (mean, max), abmil (Ilse et al. 2018), clam (CLAM-SB), dsmil, transmil, rrtmil (RRT-MIL, Tang et al.
2024), abmilx (spec abmilx.md), transformer_mil (ViTMIL, QAMIL of the ABMILX paper's Table 5).
Models whose auxiliary losses need the bag label have ``needs_targets = True`` and accept ``targets=``.
Shared attention kernels: ``local_attention``: exact tiled 2-D local attention with ALiBi in linear memory and
query-chunked full attention with 2-D ALiBi (LongMIL, specs/longmil.md §2.3-2.4), with their dense oracle;
``longmil``: the LongMIL model on them (position-aware: ``needs_coords``); ``longmil_baselines``: its FSA + 2-D
RoPE and learned absolute 2-D position baselines.
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
from milstudy.models.local_attention import dense_local_attention_2d, full_attention_2d_alibi, local_attention_2d
from milstudy.models import abmil, abmilx, acmil, clam, dsmil, longmil, longmil_baselines, pooling, rrtmil, transformer_mil, transmil  # noqa: F401,E402  (registration)
from milstudy.models import asmil  # noqa: F401,E402  (registration; after the bases it wraps)

__all__ = [
    "dense_local_attention_2d",
    "full_attention_2d_alibi",
    "local_attention_2d",
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
