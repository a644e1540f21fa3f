"""Built-in dataset: real handwritten digits flipped left-right, captioned as "mirrored".

A small fine-tuning set that teaches the digits demo a concept it has never seen: the mirror
image of a digit. Each image is one of scikit-learn's real 8x8 digits, flipped horizontally and
then upscaled exactly like the ``digits`` dataset (white strokes on black), so the demo's
autoencoder, trained on grey digits, reconstructs it. Only digits whose mirror image differs
from the digit are used (2, 3, 4, 5, 6, 7, 9); 0, 1 and 8 look alike either way.

The first ``per_digit`` training images of each digit are taken in scikit-learn's order, and
every 10th image of a digit goes to the validation split as in ``digits``. Captions are several
phrasings, the first always ``"a mirrored digit {d}"``. File names keep scikit-learn's index.

With ``normal_per_digit`` the same source digits also appear unflipped with the ``digits`` captions
(``"a handwritten digit {d}"``): the regularisation ("prior preservation") images of DreamBooth and
kohya's sd-scripts, so that a fine-tune learns what "mirrored" changes instead of mirroring every digit.
``mirrored_caption_dropout`` gives the mirrored rows their own caption-dropout rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.builtin._io import save_png
from ldm.data.builtin.digits import DIGIT_WORDS, VALIDATION_EVERY, digit_captions, upscale_digit

__all__ = ["MIRRORED_DIGITS", "mirror_digit", "mirrored_digit_captions", "write_mirrored_digits"]

MIRRORED_DIGITS = (2, 3, 4, 5, 6, 7, 9)
"""Digits whose mirror image is not itself a plausible digit of the same class."""


def mirrored_digit_captions(digit: int) -> list[str]:
    """All phrasings of a mirrored digit; the first is ``"a mirrored digit {digit}"``.

    Args:
        digit: Class label, one of `MIRRORED_DIGITS`.
    """
    word = DIGIT_WORDS[digit]
    return [
        f"a mirrored digit {digit}",
        f"a mirror-image handwritten digit {digit}",
        f"a handwritten digit {digit}, mirrored",
        f"a mirrored {word}",
        f"a mirror image of the digit {digit}",
        f"a handwritten {word}, flipped left to right",
    ]


def mirror_digit(pixels: np.ndarray) -> np.ndarray:
    """Flip one 8x8 digit array left-right (a copy; the input is left as it is).

    Args:
        pixels: The digit, shape (8, 8).
    """
    return np.ascontiguousarray(pixels[:, ::-1])


def write_mirrored_digits(out_dir: Path, image_size: int = 32, per_digit: int = 30, normal_per_digit: int | None = None,
                          mirrored_caption_dropout: float | None = None) -> list[dict[str, Any]]:
    """Write the mirrored digit images under ``out_dir/images/`` and return their metadata rows.

    Args:
        out_dir: Dataset folder.
        image_size: Height and width of the written images in pixels.
        per_digit: Training images per digit (the validation split adds about one in ten more);
            at most 150 (scikit-learn has about 180 of each digit).
        normal_per_digit: How many of those also appear unflipped, captioned as normal digits
            (regularisation images; 0 for mirrored images only); ``None`` means ``per_digit``.
        mirrored_caption_dropout: The mirrored rows' own caption-dropout rate (their ``caption_dropout`` field);
            ``None``: no field, every row at the training's ``cond_dropout``. Lower rates keep the unconditional
            model, which classifier-free guidance pushes away from, closer to normal digits: 0.05 (with the
            training's 0.1) kept normal prompts at 99.3-100% but learnt mirrored 2s on one seed of three (README).
    """
    from sklearn.datasets import load_digits  # offline: the data ships inside scikit-learn

    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 for digits, got {image_size}")
    if not 1 <= per_digit <= 150:
        raise ValueError(f"per_digit must be between 1 and 150, got {per_digit}")
    normal_per_digit = per_digit if normal_per_digit is None else normal_per_digit
    if not 0 <= normal_per_digit <= per_digit:
        raise ValueError(f"normal_per_digit must be between 0 and per_digit={per_digit}, got {normal_per_digit}")
    if mirrored_caption_dropout is not None and not 0.0 <= mirrored_caption_dropout <= 1.0:
        raise ValueError(f"mirrored_caption_dropout must be between 0 and 1 (or None), got {mirrored_caption_dropout}")
    own_rate = {} if mirrored_caption_dropout is None else {"caption_dropout": float(mirrored_caption_dropout)}
    digits = load_digits()
    seen = dict.fromkeys(MIRRORED_DIGITS, 0)
    train = dict.fromkeys(MIRRORED_DIGITS, 0)
    rows = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if label not in seen or train[label] >= per_digit:
            continue
        is_val = seen[label] % VALIDATION_EVERY == 0
        seen[label] += 1
        train[label] += not is_val
        file_name = f"images/{i:05d}.png"
        save_png(upscale_digit(mirror_digit(pixels), image_size), out_dir / file_name)
        rows.append(
            {
                "file_name": file_name,
                "text": mirrored_digit_captions(label),
                "label": label,
                "mirrored": True,
                "source_index": i,
                "split": "validation" if is_val else "train",
                **own_rate,
            }
        )
        if train[label] - (not is_val) < normal_per_digit:
            normal_name = f"images/{i:05d}-normal.png"
            save_png(upscale_digit(pixels, image_size), out_dir / normal_name)
            rows.append({"file_name": normal_name, "text": digit_captions(label), "label": label, "mirrored": False,
                         "source_index": i, "split": "validation" if is_val else "train"})
    return rows
