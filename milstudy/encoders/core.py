"""Encoder registry, the ``PatchEncoder`` wrapper (normalisation inside ``forward``) and local weight loading.

The timm-based encoders (truncated ResNet-18/50, ViT-S/16) are defined here; the CPU-sized CNN lives in
``milstudy.encoders.tiny_cnn``. ABMILX spec §2.3: ResNet with layer4 removed + GAP -> 256-d (R18) / 1024-d (R50).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ENCODERS: dict[str, Callable[..., "PatchEncoder"]] = {}


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
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder {self.name!r} expects images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
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


def build_encoder(name: str, weights: str | os.PathLike | None = None, seed: int = 0, **kwargs) -> PatchEncoder:
    """Build encoder ``name``; random init from ``seed``, then optional local ``weights`` (never a hub download).

    Returns a ``PatchEncoder`` with ``out_dim``, ``mean``, ``std``, ``name`` and ``weight_hash``.
    """
    _import_all()
    if name not in _ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(_ENCODERS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _ENCODERS[name](**kwargs)
    encoder.weight_hash = f"random-init-seed{seed}"
    if weights is not None:
        load_encoder_weights(encoder, weights)
    return encoder


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "encoder"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict (got {type(state).__name__})")
    return state


def load_encoder_weights(encoder: PatchEncoder, weights: str | os.PathLike) -> PatchEncoder:
    """Load a local state dict into ``encoder.trunk`` (strict), set ``weight_hash`` to the file's sha256.

    Accepted key layouts: the trunk's own keys, or prefixed by ``trunk.`` / ``module.`` / ``encoder.``. Keys of parts
    removed by truncation (``encoder.ignored_prefixes``) are dropped. Missing keys, unknown keys and shape mismatches
    raise a ``ValueError`` naming the key(s), the shapes and the file.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights {path} not found; pass a local .safetensors or .pt/.pth state-dict file "
            "(milstudy never downloads weights from a hub)"
        )
    raw = _read_state_dict(path)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        for prefix in ("module.", "trunk.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if any(key.startswith(p) for p in encoder.ignored_prefixes):
            continue
        state[key] = value
    own = encoder.trunk.state_dict()
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if mismatched:
        key = mismatched[0]
        raise ValueError(
            f"encoder {encoder.name!r}: weights {path} key {key!r} has shape {tuple(state[key].shape)} but the model "
            f"expects {tuple(own[key].shape)} ({len(mismatched)} mismatched keys in all); is this the checkpoint of "
            "another architecture/width?"
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"encoder {encoder.name!r}: weights {path} do not match the model: "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
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
    return PatchEncoder(vit, vit.num_features, "vit_small_patch16", ignored_prefixes=("head.",))


def _import_all() -> None:
    import milstudy.encoders.descriptor  # noqa: F401  (registers descriptor_mlp)
    import milstudy.encoders.tiny_cnn  # noqa: F401  (registers tiny_cnn, tiny_cnn_full)
