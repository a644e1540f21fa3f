"""The square image transform: PIL RGB image -> ``FloatTensor[3, S, S]`` in [-1, 1] (the bucketed one builds on it)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

__all__ = ["CROP_CHOICES", "build_transform"]

CROP_CHOICES = ("center", "random")


def build_transform(image_size: int, crop: str = "center", random_flip: bool = False) -> v2.Compose:
    """Build the PIL-RGB-image -> ``FloatTensor[3, S, S]`` in [-1, 1] transform.

    The shorter side is resized (with antialiasing) to ``image_size``, then a square of that size
    is cropped.

    Args:
        image_size: Output height and width in pixels.
        crop: ``"center"`` for a centre crop, ``"random"`` for a random crop (augmentation).
        random_flip: Flip horizontally with probability 0.5. Off by default because it makes
            captions that say "left" or "right" wrong.

    Raises:
        ValueError: Unknown ``crop`` or a non-positive ``image_size``.
    """
    if crop not in CROP_CHOICES:
        raise ValueError(f"crop must be one of {CROP_CHOICES}, got {crop!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
    steps: list[v2.Transform] = [
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size) if crop == "center" else v2.RandomCrop(image_size),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),  # [0, 1] -> [-1, 1]
    ]
    return v2.Compose(steps)
