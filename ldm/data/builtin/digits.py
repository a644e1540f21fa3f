"""Built-in dataset: scikit-learn's 1,797 real 8x8 handwritten digits, upscaled, with captions.

Each digit becomes an RGB PNG (white strokes on black, like the originals) resized with bicubic
interpolation. Its captions are several phrasings of the label, the first always
``"a handwritten digit {d}"``. Every 10th image of each class is in the validation split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.builtin._io import save_png

__all__ = ["DIGIT_WORDS", "digit_captions", "upscale_digit", "write_digits"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VALIDATION_EVERY = 10


def digit_captions(digit: int) -> list[str]:
    """All phrasings of a digit label; the first is ``"a handwritten digit {digit}"``.

    Args:
        digit: Class label, 0 to 9.
    """
    word = DIGIT_WORDS[digit]
    return [
        f"a handwritten digit {digit}",
        f"a handwritten {word}",
        f"the number {word}",
        f"a hand-drawn {digit}",
        f"the digit {digit}",
        f"a handwritten number {word}",
    ]


def upscale_digit(pixels: np.ndarray, image_size: int) -> Image.Image:
    """Turn one 8x8 array of values 0..16 into a smooth ``image_size`` square RGB image.

    Args:
        pixels: The digit, shape (8, 8), values 0..16.
        image_size: Output height and width.
    """
    grey = Image.fromarray((pixels.astype(np.float32) * (255.0 / 16.0)).astype(np.float32))
    grey = grey.resize((image_size, image_size), Image.Resampling.BICUBIC)
    values = np.clip(np.rint(np.asarray(grey)), 0, 255).astype(np.uint8)
    return Image.fromarray(values).convert("RGB")


def write_digits(out_dir: Path, image_size: int = 32) -> list[dict[str, Any]]:
    """Write the digit images under ``out_dir/images/`` and return their metadata rows.

    Args:
        out_dir: Dataset folder.
        image_size: Height and width of the written images in pixels.
    """
    from sklearn.datasets import load_digits  # offline: the data ships inside scikit-learn

    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 for digits, got {image_size}")
    digits = load_digits()
    seen_per_class = [0] * 10
    rows = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        file_name = f"images/{i:05d}.png"
        save_png(upscale_digit(pixels, image_size), out_dir / file_name)
        is_val = seen_per_class[label] % VALIDATION_EVERY == 0
        seen_per_class[label] += 1
        rows.append(
            {
                "file_name": file_name,
                "text": digit_captions(label),
                "label": label,
                "split": "validation" if is_val else "train",
            }
        )
    return rows
