"""The square image transform: PIL RGB image -> ``FloatTensor[3, S, S]`` in [-1, 1] (the bucketed one builds on it)."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["CROP_CHOICES", "SquareCrop", "build_transform"]

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
        SquareCrop(image_size, crop),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),  # [0, 1] -> [-1, 1]
    ]
    return v2.Compose(steps)


class SquareCrop(v2.Transform):
    """Crop a ``size x size`` square, centred or at a uniformly random offset, and remember where (``last_top_left``,
    the SDXL crop micro-conditioning). The same crops as ``v2.CenterCrop`` / ``v2.RandomCrop`` (with the same
    ``torch.randint`` draws) for images at least ``size`` on each side, as they are after the shorter side's resize.
    """

    def __init__(self, size: int, crop: str = "center") -> None:
        super().__init__()
        if crop not in CROP_CHOICES:
            raise ValueError(f"crop must be one of {CROP_CHOICES}, got {crop!r}")
        self.size, self.crop = size, crop
        self.last_top_left = (0, 0)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        if self.crop == "random":
            top = int(torch.randint(0, height - self.size + 1, size=())) if height > self.size else 0
            left = int(torch.randint(0, width - self.size + 1, size=())) if width > self.size else 0
        else:
            top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        self.last_top_left = (top, left)
        return {"top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, top=params["top"], left=params["left"], height=self.size, width=self.size)
