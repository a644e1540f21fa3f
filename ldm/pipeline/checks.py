"""Argument and output checks of the pipeline: finite numbers in range, sizes under a limit checked before any
allocation, and no non-finite image handed back as if it were one."""

from __future__ import annotations

import math
import numbers

import torch

DEFAULT_MAX_PIXELS = 2048 * 2048  # per image; LatentDiffusionPipeline.max_pixels changes it
DEFAULT_MAX_BATCH_PIXELS = 64 * 512 * 512  # all images of one call; LatentDiffusionPipeline.max_batch_pixels


class NonFiniteOutputError(ValueError):
    """Sampling or decoding produced NaN or infinite values (the image would be black or noise)."""


def check_finite(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` (a number or a one-element tensor) is finite and in ``[low, high]``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def check_size(height: int, width: int, factor: int, max_pixels: int, what: str = "") -> None:
    """Raise ``ValueError`` for a non-positive or non-multiple size, or one over ``max_pixels`` per image, before
    anything is allocated; the message states the memory the request would need."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % factor:
            raise ValueError(f"{what or name} must be a positive multiple of {factor} (the autoencoder's and UNet's downsampling), got {value!r}")
    height, width = int(height), int(width)
    if height * width > max_pixels:
        # The decoder's widest activations dominate: about 128 channels x 4 bytes per pixel, twice (in and out).
        estimate = height * width * 128 * 4 * 2
        raise ValueError(f"{what + ' ' if what else ''}{height}x{width} is {height * width:,} pixels per image, over the limit of {max_pixels:,} "
                         f"(about {estimate / 2**30:.1f} GiB for one image's decode); raise pipe.max_pixels if the "
                         "machine has the memory")


def check_batch(images: int, height: int, width: int, max_batch_pixels: int) -> None:
    """Raise ``ValueError`` when one call's images together exceed ``max_batch_pixels``, before anything is allocated."""
    total = images * height * width
    if total > max_batch_pixels:
        estimate = total * 128 * 4 * 2  # the decoder's widest activations, as in check_size
        raise ValueError(f"{images} images of {height}x{width} are {total:,} pixels in one call, over the limit of "
                         f"{max_batch_pixels:,} (about {estimate / 2**30:.1f} GiB to decode them at once): generate in "
                         "several calls, or raise pipe.max_batch_pixels if the machine has the memory")


def check_finite_output(values: torch.Tensor, stage: str) -> None:
    """Raise :class:`NonFiniteOutputError` if ``values`` (the ``stage``'s result) hold NaN or infinity."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteOutputError(
            f"the {stage} hold NaN or infinite values, so the images would be black: check the model's weights (NaN "
            "weights, a VAE run in fp16 that overflows: use fp32 or bf16 for the VAE) and the arguments (guidance, "
            "init image, mask)")
