"""Encoder registry, the ``PatchEncoder`` wrapper (normalisation inside ``forward``) and local weight loading.

The timm-based encoders (truncated ResNet-18/50, ViT-S/16) are defined here; the CPU-sized CNN lives in
``milstudy.encoders.tiny_cnn``. ABMILX spec §2.3: ResNet with layer4 removed + GAP -> 256-d (R18) / 1024-d (R50).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ENCODERS: dict[str, Callable[..., "PatchEncoder"]] = {}
STRIP_PREFIXES = ("module.", "trunk.", "encoder.", "backbone.")


class PatchEncoder(nn.Module):
    """A trunk ``[B,3,H,W] -> [B,out_dim]`` plus its input normalisation.

    ``forward(x)``: ``x`` float ``[B, 3, H, W]`` in [0, 1], or uint8 in [0, 255] (converted on x's device) ->
    ``[B, out_dim]``. On CUDA the input is converted to
    channels_last (call ``.to(memory_format=torch.channels_last)`` on the module too, as the E2E trainer does).
    ``ignored_prefixes``: state-dict keys of the parts removed by truncation (e.g. ``layer4.``, ``fc.``); a full
    checkpoint of the untruncated network loads, and these keys are dropped.
    """

    def __init__(
        self,
        trunk: nn.Module,
        out_dim: int,
        name: str,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        ignored_prefixes: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_dim = int(out_dim)
        self.name = name
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.ignored_prefixes = ignored_prefixes
        self.weight_hash = "unset"
        self.checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder {self.name!r} expects images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        embed = getattr(self.trunk, "patch_embed", None)
        if getattr(embed, "strict_img_size", False) and tuple(x.shape[-2:]) != tuple(embed.img_size):
            raise ValueError(
                f"encoder {self.name!r} is built for {tuple(embed.img_size)}-px inputs, got {tuple(x.shape[-2:])}: "
                f"build it with img_size={x.shape[-1]} (a checkpoint at another size is adapted on loading: its "
                "pos_embed is resampled) or dynamic_img_size=True, or resize the patches")
        if x.dtype == torch.uint8:
            x = x.to(self._mean.dtype).div_(255.0)
        x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.trunk(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_dim={self.out_dim}, weight_hash={self.weight_hash[:16]!r}"


def register_encoder(name: str) -> Callable[[Callable[..., PatchEncoder]], Callable[..., PatchEncoder]]:
    """Decorator: register ``fn(**kw) -> PatchEncoder`` under ``name``."""

    def decorator(fn: Callable[..., PatchEncoder]) -> Callable[..., PatchEncoder]:
        if name in _ENCODERS:
            raise ValueError(f"encoder name {name!r} is registered twice")
        _ENCODERS[name] = fn
        return fn

    return decorator


def list_encoders() -> list[str]:
    """Names accepted by ``build_encoder``."""
    _import_all()
    return sorted(_ENCODERS)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    weights_key: str | None = None,
    **kwargs: Any,
) -> PatchEncoder:
    """Build encoder ``name``; random init from ``seed``, then optional local ``weights`` (never a hub download).

    ``name``: a registered name (``list_encoders()``: our encoders and the foundation-model presets ``uni``,
    ``h_optimus_0``, ``h0_mini``, ``virchow``, ``ctranspath_like``) or ``"timm:<arch>"`` for any timm architecture
    (``kwargs`` go to ``timm.create_model``; see ``milstudy.encoders.timm_encoders``). ``weights_key``: the entry of
    a checkpoint dict that holds the state dict (e.g. ``"teacher"`` for DINO/HIPT checkpoints).
    Returns a ``PatchEncoder`` with ``out_dim``, ``mean``, ``std``, ``name`` and ``weight_hash``.
    """
    _import_all()
    if name.startswith("timm:"):
        from milstudy.encoders.timm_encoders import build_timm_encoder

        factory: Callable[..., Any] = lambda **kw: build_timm_encoder(name[len("timm:"):], **kw)  # noqa: E731
    elif name in _ENCODERS:
        factory = _ENCODERS[name]
    else:
        raise KeyError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(_ENCODERS))}, "
                       "or 'timm:<architecture>' for any timm model (e.g. 'timm:vit_base_patch16_224')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = factory(**kwargs)
    encoder.weight_hash = f"random-init-seed{seed}"
    if weights is not None:
        load_encoder_weights(encoder, weights, weights_key=weights_key)
    elif weights_key is not None:
        raise ValueError("build_encoder: weights_key is given but no weights file")
    return encoder


def read_checkpoint(path: str | os.PathLike, weights_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a local weights file, with DDP / torch.compile prefixes removed (timm's ``clean_state_dict``).

    Files: ``.safetensors``; anything else through ``torch.load(weights_only=True)`` with ``argparse.Namespace``
    allowed (timm training checkpoints store their ``args``). Entry selection: ``weights_key`` when given (an error
    lists the entries otherwise); else the first of ``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``
    (timm's ``load_state_dict`` order), ``encoder``; a checkpoint with both ``teacher`` and ``student`` (DINO, HIPT)
    needs an explicit ``weights_key``.
    """
    import argparse

    from timm.models import clean_state_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors of foreign objects, corrupt files
            from milstudy.console import torch_load_refusal

            raise ValueError(torch_load_refusal(err, f"weights file {path}")) from err
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict (got {type(state).__name__})")
    if weights_key is not None:
        if weights_key not in state or not isinstance(state[weights_key], dict):
            raise KeyError(f"weights file {path} has no state dict under key {weights_key!r}; "
                           f"its entries: {sorted(map(str, state))[:20]}")
        state = state[weights_key]
    elif not all(isinstance(v, torch.Tensor) for v in state.values()):
        if "teacher" in state and "student" in state:
            raise ValueError(f"weights file {path} holds both 'teacher' and 'student' networks (DINO/HIPT): "
                             "pass weights_key='teacher' (or 'student')")
        for key in ("state_dict_ema", "model_ema", "state_dict", "model", "encoder", "teacher"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        else:
            raise ValueError(f"weights file {path}: no state dict found among its entries {sorted(map(str, state))[:20]}; "
                             "pass weights_key=...")
    return clean_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def load_encoder_weights(
    encoder: PatchEncoder,
    weights: str | os.PathLike,
    weights_key: str | None = None,
    strip_prefixes: tuple[str, ...] = STRIP_PREFIXES,
) -> PatchEncoder:
    """Load a local state dict into ``encoder.trunk`` (strict), set ``weight_hash`` to the file's sha256.

    Keys: the trunk's own, or prefixed by any of ``strip_prefixes`` (``module.``, ``trunk.``, ``encoder.``,
    ``backbone.``; removed repeatedly). Keys of parts removed by truncation or absent heads
    (``encoder.ignored_prefixes``) are dropped. Then the architecture's timm ``checkpoint_filter_fn`` (if any:
    ``encoder.checkpoint_filter``) adapts the checkpoint, e.g. resamples a ViT's ``pos_embed`` to the encoder's
    ``img_size``. Missing keys, unknown keys and shape mismatches raise a ``ValueError`` naming the key(s), both
    shapes and the file.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights {path} not found; pass a local .safetensors or .pt/.pth/.bin state-dict file "
            "(milstudy never downloads weights from a hub)"
        )
    raw = read_checkpoint(path, weights_key)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in strip_prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if any(key.startswith(p) for p in encoder.ignored_prefixes):
            continue
        state[key] = value
    own = encoder.trunk.state_dict()
    checkpoint_filter = getattr(encoder, "checkpoint_filter", None)
    if checkpoint_filter is not None:
        state = checkpoint_filter(state, getattr(encoder.trunk, "_model", encoder.trunk))
        state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in encoder.ignored_prefixes)}
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if mismatched:
        key = mismatched[0]
        hint = ("build the encoder with the checkpoint's img_size / patch_size" if "pos_embed" in key or
                "patch_embed" in key else "is this the checkpoint of another architecture or width?")
        raise ValueError(
            f"encoder {encoder.name!r}: weights {path} key {key!r} has shape {tuple(state[key].shape)} but the model "
            f"expects {tuple(own[key].shape)} ({len(mismatched)} mismatched keys in all); {hint}"
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"encoder {encoder.name!r}: weights {path} do not match the model: "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            f"{'; pass weights_key=... to pick the right entry of the checkpoint' if len(missing) == len(own) else ''}"
        )
    encoder.trunk.load_state_dict(state, strict=True)
    encoder.weight_hash = file_sha256(path)
    return encoder


# --- timm encoders ---------------------------------------------------------------------------------------------


class _TruncatedResNet(nn.Module):
    """timm ResNet without layer4 and fc: stem -> layer1..3 -> global average pool."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def _truncated_resnet(arch: str, out_dim: int, name: str) -> PatchEncoder:
    import timm

    resnet = timm.create_model(arch, pretrained=False, num_classes=0)
    return PatchEncoder(_TruncatedResNet(resnet), out_dim, name, ignored_prefixes=("layer4.", "fc."))


@register_encoder("resnet18_trunc")
def resnet18_trunc() -> PatchEncoder:
    """ImageNet-style ResNet-18 truncated after stage 3 + GAP -> 256-d (ABMILX R18)."""
    return _truncated_resnet("resnet18", 256, "resnet18_trunc")


@register_encoder("resnet50_trunc")
def resnet50_trunc() -> PatchEncoder:
    """ResNet-50 truncated after stage 3 + GAP -> 1024-d (CLAM / ABMILX R50)."""
    return _truncated_resnet("resnet50", 1024, "resnet50_trunc")


@register_encoder("vit_small_patch16")
def vit_small_patch16(img_size: int = 224, pool: str = "token") -> PatchEncoder:
    """timm ViT-S/16 (384-d); ``pool="token"`` (CLS) or ``"avg"`` (mean of patch tokens)."""
    import timm

    if pool not in ("token", "avg"):
        raise ValueError(f"vit_small_patch16: pool must be 'token' (CLS) or 'avg' (mean token), got {pool!r}")
    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=img_size, global_pool=pool
    )
    from timm.models.vision_transformer import checkpoint_filter_fn

    encoder = PatchEncoder(vit, vit.num_features, "vit_small_patch16", ignored_prefixes=("head.",))
    encoder.checkpoint_filter = checkpoint_filter_fn  # resamples pos_embed of a checkpoint at another img_size
    return encoder


def _import_all() -> None:
    import milstudy.encoders.descriptor  # noqa: F401  (registers descriptor_mlp)
    import milstudy.encoders.timm_encoders  # noqa: F401  (registers uni, h_optimus_0, h0_mini, virchow, ...)
    import milstudy.encoders.tiny_cnn  # noqa: F401  (registers tiny_cnn, tiny_cnn_full)
