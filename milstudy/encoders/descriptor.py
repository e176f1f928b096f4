"""A descriptor encoder for the cheap synthetic tier (specs/abmilx.md §4.1, specs/asmil.md §4.1 "S-vec"): each
"patch" is a raw descriptor vector ``[d]`` instead of an image, and a trainable MLP stands in for the patch CNN, so
end-to-end training keeps its gradient path (sampler -> encoder -> aggregator -> slide loss) at a fraction of the
cost of pixels.

``descriptor_mlp(in_dim, widths=(64, 64))``: ``[K, in_dim] -> [K, widths[-1]]``, Linear -> LayerNorm -> GELU per
layer (no normalisation of the input beyond what the generator gives).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from milstudy.encoders.core import register_encoder


class DescriptorMLP(nn.Module):
    """``forward(x [K, in_dim]) -> [K, out_dim]``; ``out_dim``, ``name``, ``weight_hash`` as every encoder."""

    def __init__(self, in_dim: int, widths: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        if in_dim < 1 or not widths or min(widths) < 1:
            raise ValueError(f"descriptor_mlp: in_dim and widths must be positive, got {in_dim}, {list(widths)}")
        layers: list[nn.Module] = []
        previous = in_dim
        for width in widths:
            layers += [nn.Linear(previous, width), nn.LayerNorm(width), nn.GELU()]
            previous = width
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim, self.name = in_dim, previous, "descriptor_mlp"
        self.weight_hash = "random-init"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[-1] != self.in_dim:
            raise ValueError(f"descriptor_mlp expects descriptors [K, {self.in_dim}], got {tuple(x.shape)}")
        return self.net(x.float())


@register_encoder("descriptor_mlp")
def descriptor_mlp(in_dim: int, widths: Sequence[int] = (64, 64)) -> DescriptorMLP:
    return DescriptorMLP(in_dim, tuple(widths))
