"""Open any image file PIL understands as a fully decoded 8-bit RGB image.

`load_rgb` is the one place where image files enter the data pipeline, so every format quirk is
handled here: EXIF orientation, palettes with transparency, alpha channels, 16/32-bit integer and
float greyscale, and colour spaces other than RGB. Broken files raise `BadImageError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImageError", "load_rgb", "to_rgb"]

# Transparent pixels are composited on this background (what a viewer shows on a white page).
BACKGROUND_RGB = (255, 255, 255)

_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_INTEGER_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_OTHER_COLOUR_MODES = {"CMYK", "YCbCr", "LAB", "HSV"}
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


class BadImageError(ValueError):
    """An image file that cannot be read: empty, not an image, truncated or undecodable.

    Attributes:
        path: The offending file, as given.
        reason: A short human-readable explanation.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable (DataLoader workers)
        return (type(self), (self.path, self.reason))


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open, fully decode, orient and convert an image file to 8-bit RGB.

    Args:
        path: Image file to read.

    Returns:
        A decoded `PIL.Image.Image` in mode ``"RGB"``, rotated/flipped according to its EXIF
        Orientation tag. Transparent areas are composited on white.

    Raises:
        BadImageError: The file is missing, empty, not an image, truncated or cannot be decoded.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except OSError as exc:
        raise BadImageError(path, f"cannot access file ({exc})") from exc
    if not path.is_file():
        raise BadImageError(path, "not a regular file")
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # decode every pixel now so truncated files fail here, not mid-training
            oriented = ImageOps.exif_transpose(img)
        return to_rgb(oriented)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can identify") from None
    except BadImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise BadImageError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Args:
        img: A loaded image.

    Returns:
        An image in mode ``"RGB"`` (``img`` itself when it already is RGB).

    Raises:
        ValueError: The mode has no sensible RGB conversion.
    """
    mode = img.mode
    keyed = "transparency" in img.info  # palette or colour-key transparency (PNG tRNS, GIF)
    if mode in _ALPHA_MODES or (keyed and mode in ("P", "L", "RGB")):
        return _composite_on_background(img.convert("RGBA"))
    if mode == "RGB":
        return img
    if mode in ("1", "L", "P"):
        return img.convert("RGB")
    if mode in _INTEGER_GREY_MODES:
        values = np.asarray(img).astype(np.int64)
        grey = np.clip(values, 0, 65535) / 257.0
        return _grey_array_to_rgb(grey)
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        return _grey_array_to_rgb(np.nan_to_num(values, nan=0.0))
    if mode in _OTHER_COLOUR_MODES:
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported image mode {mode!r}") from exc


def _composite_on_background(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_array_to_rgb(grey: np.ndarray) -> Image.Image:
    grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(grey8).convert("RGB")
