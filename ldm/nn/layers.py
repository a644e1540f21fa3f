"""Small layers that the UNet and the KL autoencoder share: GroupNorm fitted to narrow layers, and the x2 upsampler.

Their sub-module names (the upsampler's ``conv``) are those of Stable Diffusion's checkpoints, in both networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """Affine GroupNorm with the largest group count ``<= num_groups`` that divides ``channels``.

    SD uses 32 groups everywhere, with eps 1e-5 in the UNet's ResBlocks and output norm and 1e-6 in its
    SpatialTransformer norm and throughout the VAE; tiny test models with fewer channels get fewer groups.
    """
    groups = max(1, min(num_groups, channels))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
