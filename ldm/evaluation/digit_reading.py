"""How the digits demo reads a generated image: the way scikit-learn's real digits are stored (grey, 8x8, 0..16)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["images_to_digit_features"]


def images_to_digit_features(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, 3, H, W) -> (B, 64) features on the digits' 0..16 scale."""
    grey = ((images.float().clamp(-1, 1) + 1) / 2).mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, (8, 8))
    return (small.flatten(1) * 16.0).cpu().numpy()
