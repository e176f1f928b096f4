"""Encoders by any timm architecture name, and presets for the foundation models CPath users run (names + kwargs).

``build_encoder("timm:<arch>", weights=FILE, weights_key=None, img_size=None, pool=None, mean=None, std=None,
**timm_kwargs)`` creates ``timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)`` (never a
download) and wraps it in a :class:`~milstudy.encoders.core.PatchEncoder`: ``[B, 3, H, W]`` in [0, 1] ->
``[B, out_dim]``. Normalisation: ``mean``/``std`` given, else the model's own ``pretrained_cfg`` (what timm
would use for its pretrained weights). ``img_size``: the input size the encoder is built for; a checkpoint saved at
another size is adapted on loading by timm's own ``checkpoint_filter_fn`` of the architecture's module (for ViTs it
resamples ``pos_embed``, so a 224-px checkpoint extracts 256-px patches). ``pool``: timm's ``global_pool``
(``"token"`` = CLS, ``"avg"``), or ``"cls+mean"`` (CLS token concatenated with the mean of the patch tokens,
registers excluded: the Virchow embedding, 2 x embed_dim).

Presets (``TIMM_PRESETS``; the architecture and kwargs only, weights are always a local file you pass):

- ``uni``: UNI (Chen et al. 2024, hf.co/MahmoodLab/UNI model card): ``vit_large_patch16_224``, ``img_size=224``,
  ``patch_size=16``, ``init_values=1e-5``, ``dynamic_img_size=True``, no head; 1024-d CLS token; ImageNet mean/std.
- ``h_optimus_0``: H-optimus-0 (hf.co/bioptimus/H-optimus-0, its timm ``config.json``): ``vit_giant_patch14_reg4_dinov2``
  at ``img_size=224``, ``init_values=1e-5``, ``dynamic_img_size=True``; 1536-d CLS; mean (0.707223, 0.578729,
  0.703617), std (0.211883, 0.230117, 0.177517) from the model card.
- ``h0_mini``: H0-mini style (hf.co/bioptimus/H0-mini): ``vit_base_patch14_reg4_dinov2`` at 224 with
  ``mlp_layer=SwiGLUPacked``, ``act_layer=SiLU`` (the model card passes both to ``timm.create_model``); 768-d CLS;
  the H-optimus mean/std. Our recorded shapes cover the embedding, tokens and attention, not the MLP width.
- ``virchow``: Virchow (hf.co/paige-ai/Virchow, its ``config.json`` + model card): ``vit_huge_patch14_224``,
  ``init_values=1e-5``, ``mlp_ratio=5.3375``, ``mlp_layer=SwiGLUPacked``, ``act_layer=SiLU``,
  ``dynamic_img_size=True``; embedding CLS + mean patch token (2560-d); ImageNet mean/std.
- ``ctranspath_like``: timm's ``swin_tiny_patch4_window7_224`` (768-d). CTransPath itself (Wang et al. 2022) replaces
  the patch embedding by a convolutional stem (``ConvStem``, defined in its own repository, not in timm), so its
  ``patch_embed.*`` weights do not fit this model: timm cannot build CTransPath exactly; every other key
  (``layers.*``, ``norm.*``) has CTransPath's layout after timm's Swin ``checkpoint_filter_fn``.

Architecture kwargs that name classes (``mlp_layer``, ``act_layer``, ``norm_layer``) may be given as strings:
``"SwiGLUPacked"`` is looked up in ``timm.layers``, ``"SiLU"``/``"GELU"`` in ``torch.nn`` (so YAML configs work).
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, Callable

import torch
from torch import nn

from milstudy.encoders.core import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, register_encoder

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

TIMM_PRESETS: dict[str, dict[str, Any]] = {
    "uni": {"arch": "vit_large_patch16_224", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}},
    "h_optimus_0": {"arch": "vit_giant_patch14_reg4_dinov2", "mean": HOPTIMUS_MEAN, "std": HOPTIMUS_STD,
                    "kwargs": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True}},
    "h0_mini": {"arch": "vit_base_patch14_reg4_dinov2", "mean": HOPTIMUS_MEAN, "std": HOPTIMUS_STD,
                "kwargs": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True,
                           "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}},
    "virchow": {"arch": "vit_huge_patch14_224", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "pool": "cls+mean",
                "kwargs": {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "mlp_layer": "SwiGLUPacked",
                           "act_layer": "SiLU", "dynamic_img_size": True}},
    "ctranspath_like": {"arch": "swin_tiny_patch4_window7_224", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                        "kwargs": {}},
}

_CLASS_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer")


def _resolve_class(name: str, value: Any) -> Any:
    """``"SwiGLUPacked"`` -> ``timm.layers.SwiGLUPacked``; ``"SiLU"`` -> ``torch.nn.SiLU``; others unchanged."""
    if not isinstance(value, str):
        return value
    import timm.layers

    for namespace in (timm.layers, nn):
        if hasattr(namespace, value):
            return getattr(namespace, value)
    if name in ("act_layer", "norm_layer"):
        return value  # timm also accepts its own string names ("gelu", "layernorm")
    raise ValueError(f"timm encoder: {name}={value!r} is neither in timm.layers nor in torch.nn")


class _ClsMeanPool(nn.Module):
    """``forward_features`` tokens ``[B, T, D]`` -> ``[B, 2D]``: CLS token ++ mean of the patch tokens (registers
    and other prefix tokens excluded), the Virchow embedding (paige-ai/Virchow model card)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


class _TokenPoolTrunk(nn.Module):
    """A timm ViT whose output is pooled by ``pool`` from ``forward_features``. The ViT is registered under
    ``_model`` but its state dict is the ViT's own (keys without a prefix), so checkpoints load unchanged."""

    def __init__(self, model: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self._model = model
        self.pool = pool
        self._register_state_dict_hook(_strip_model_prefix)
        self._register_load_state_dict_pre_hook(_add_model_prefix)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_model"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self._model.forward_features(x))


def _strip_model_prefix(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> dict:
    for key in list(state):
        if key.startswith(prefix + "_model."):
            state[prefix + key[len(prefix) + len("_model."):]] = state.pop(key)
    return state


def _add_model_prefix(state: dict, prefix: str, *args: Any) -> None:
    for key in list(state):
        if key.startswith(prefix) and not key.startswith(prefix + "_model."):
            state[prefix + "_model." + key[len(prefix):]] = state.pop(key)


def timm_checkpoint_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict] | None:
    """timm's own ``checkpoint_filter_fn`` for ``model``'s architecture module (ViT: resamples ``pos_embed`` to the
    model's grid, adapts patch-embedding kernels; Swin: old-layout keys, relative-position tables), or None."""
    inner = getattr(model, "_model", model)
    module = sys.modules.get(type(inner).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def build_timm_encoder(
    arch: str,
    *,
    img_size: int | None = None,
    pool: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    name: str | None = None,
    **timm_kwargs: Any,
) -> PatchEncoder:
    """A timm architecture without head (``num_classes=0``, ``pretrained=False``) as a ``PatchEncoder``.

    See the module docstring for ``img_size``, ``pool``, ``mean``/``std``. Raises ``KeyError`` for a name timm does
    not know, with the closest timm names as a hint.
    """
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise KeyError(f"timm does not know the architecture {arch!r}; closest timm names: {close or 'none'} "
                       f"(see timm.list_models('*{arch.split('_')[0]}*'))")
    kwargs = {k: _resolve_class(k, v) if k in _CLASS_KWARGS else v for k, v in timm_kwargs.items()}
    kwargs.pop("pretrained", None)
    kwargs.pop("num_classes", None)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    if pool is not None and pool != "cls+mean":
        kwargs["global_pool"] = pool
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(std) if std is not None else tuple(cfg.get("std", IMAGENET_STD))
    out_dim = int(model.num_features)
    trunk: nn.Module = model
    if pool == "cls+mean":
        if not hasattr(model, "forward_features") or not hasattr(model, "num_prefix_tokens"):
            raise ValueError(f"pool='cls+mean' needs a token model (ViT); {arch} is a {type(model).__name__}")
        trunk = _TokenPoolTrunk(model, _ClsMeanPool(model.num_prefix_tokens))
        out_dim = 2 * out_dim
    encoder = PatchEncoder(trunk, out_dim, name or f"timm:{arch}", mean, std,
                           ignored_prefixes=("head.", "fc.", "head_dist.", "classifier."))
    encoder.checkpoint_filter = timm_checkpoint_filter(trunk)
    encoder.timm_config = {"arch": arch, "img_size": img_size, "pool": pool, **{k: _plain(v) for k, v in
                                                                                timm_kwargs.items()}}
    return encoder


def _plain(value: Any) -> Any:
    return value.__name__ if isinstance(value, type) else value


def _preset(preset: str) -> Callable[..., PatchEncoder]:
    spec = TIMM_PRESETS[preset]

    def build(**overrides: Any) -> PatchEncoder:
        kwargs = {**spec["kwargs"], **overrides}
        kwargs.setdefault("mean", spec["mean"])
        kwargs.setdefault("std", spec["std"])
        if "pool" in spec:
            kwargs.setdefault("pool", spec["pool"])
        return build_timm_encoder(spec["arch"], name=preset, **kwargs)

    build.__doc__ = f"Preset {preset!r}: timm {spec['arch']} with {spec['kwargs']} (module docstring: source)."
    return build


for _name in TIMM_PRESETS:
    register_encoder(_name)(_preset(_name))
