"""LPIPS perceptual distance, usable only when its backbone weights are already on disk.

torchmetrics ships LPIPS's small linear heads; the backbone (VGG16, AlexNet or SqueezeNet) comes from
torchvision's ImageNet weights, which torchvision would download into the torch hub cache. Training
must never download, so we look for the file first and fail with instructions when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

_BACKBONES = {"vgg": ("vgg16", "VGG16_Weights"), "alex": ("alexnet", "AlexNet_Weights"), "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights that LPIPS's ``net`` backbone needs."""
    if net not in _BACKBONES:
        raise ValueError(f"lpips_net={net!r} is not one of {sorted(_BACKBONES)}")
    weights = getattr(torchvision.models, _BACKBONES[net][1]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def build_lpips(net: str = "vgg") -> nn.Module:
    """A frozen LPIPS module mapping two image batches in [-1, 1] to per-image distances (B, 1, 1, 1).

    Raises:
        FileNotFoundError: the backbone weights are not in the torch hub cache.
    """
    path = lpips_backbone_path(net)
    if not path.is_file():
        raise FileNotFoundError(
            f"The perceptual (LPIPS) loss needs torchvision's {_BACKBONES[net][0]} ImageNet weights at {path}, "
            "and ldm never downloads at run time. Copy that file there (or set TORCH_HOME to a directory whose "
            "hub/checkpoints/ holds it), or set perceptual_weight: 0."
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    lpips = LearnedPerceptualImagePatchSimilarity(net_type=net).net
    lpips.eval().requires_grad_(False)
    return lpips
