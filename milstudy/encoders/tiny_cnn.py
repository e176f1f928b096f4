"""A small ResNet-style CNN that trains end to end on a 2-core CPU in minutes (ABMILX spec §2.3, "CPU profile").

Four stages of 16/32/64/128 channels, each one residual basic block (3x3 conv - BN - ReLU - 3x3 conv - BN, plus a
1x1 projection when the shape changes); stages 2-4 halve the resolution. ``tiny_cnn`` drops the last stage as
the truncated ResNets do (64-d); ``tiny_cnn_full`` keeps it (128-d). Meant for 32-64 px patches; the stem has stride 2 by default (4x cheaper, 256 patches fwd+bwd ~0.5 s on 2
cores). Input normalisation: mean 0.5, std 0.25 per channel (no ImageNet statistics for a from-scratch net). Plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from milstudy.encoders.core import PatchEncoder, register_encoder


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyCNN(nn.Module):
    """Stem (3x3 conv, ``stem_stride``) + ``len(widths)`` stages + GAP: ``[B,3,H,W] -> [B, widths[-1]]``."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), stem_stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(in_ch, width, stride=1 if i == 0 else 2))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


_TINY_MEAN = (0.5, 0.5, 0.5)
_TINY_STD = (0.25, 0.25, 0.25)


@register_encoder("tiny_cnn")
def tiny_cnn(widths: tuple[int, ...] = (16, 32, 64, 128), stem_stride: int = 2) -> PatchEncoder:
    """Tiny CNN with the last of ``widths`` dropped (truncation): out_dim = ``widths[-2]`` (64 by default)."""
    kept = tuple(widths[:-1])
    return PatchEncoder(TinyCNN(kept, stem_stride), kept[-1], "tiny_cnn", _TINY_MEAN, _TINY_STD)


@register_encoder("tiny_cnn_full")
def tiny_cnn_full(widths: tuple[int, ...] = (16, 32, 64, 128), stem_stride: int = 2) -> PatchEncoder:
    """Tiny CNN with every stage: out_dim = ``widths[-1]`` (128 by default)."""
    return PatchEncoder(TinyCNN(tuple(widths), stem_stride), widths[-1], "tiny_cnn_full", _TINY_MEAN, _TINY_STD)
