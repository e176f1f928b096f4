"""Patch encoders for feature extraction and end-to-end training (ABMILX spec §2.3, DESIGN.md "encoders").

One door: ``build_encoder(name, weights=None, seed=0, **kw) -> PatchEncoder``. Every encoder takes float images
``[B, 3, H, W]`` in [0, 1], applies its own input normalisation (``mean``, ``std``) inside ``forward`` and returns
``[B, out_dim]``. Weights are random (seeded, ``weight_hash = "random-init-seed<k>"``) or come from a *local* file
(safetensors, or a state dict read with ``torch.load(weights_only=True)``; ``weight_hash`` = its sha256). Nothing is
ever fetched from a hub: timm models are always created with ``pretrained=False``.

Names (see ``list_encoders()``):
- ``resnet18_trunc`` / ``resnet50_trunc``: timm ResNet with the last stage (layer4) removed + global average pooling,
  256-d / 1024-d (the CLAM convention; ABMILX's encoders).
- ``vit_small_patch16``: timm ``vit_small_patch16_224`` (384-d), ``img_size`` configurable, CLS or mean token.
- ``tiny_cnn`` / ``tiny_cnn_full``: a small ResNet-style CNN for the 2-core CPU profile (4 stages 16/32/64/128,
  BN + ReLU, stride-2 stem); ``tiny_cnn`` drops the last stage ("truncation", 64-d), ``tiny_cnn_full`` keeps it (128-d).
- ``timm:<arch>`` (any timm architecture + a local weights file) and the presets ``uni``, ``h_optimus_0``,
  ``h0_mini``, ``virchow``, ``ctranspath_like`` (``milstudy.encoders.timm_encoders``).
- ``descriptor_mlp``: an MLP over descriptor vectors ``[K, d]`` (the cheap synthetic tier, no images).
"""

from __future__ import annotations

from milstudy.encoders.core import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchEncoder,
    build_encoder,
    file_sha256,
    list_encoders,
    load_encoder_weights,
    read_checkpoint,
    register_encoder,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchEncoder",
    "build_encoder",
    "file_sha256",
    "list_encoders",
    "load_encoder_weights",
    "read_checkpoint",
    "register_encoder",
]
