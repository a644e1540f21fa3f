"""Open any image file PIL understands as a fully decoded 8-bit RGB image.

`load_rgb` is the one place where image files enter the data pipeline, so every format quirk is
handled here: EXIF orientation, palettes with transparency, alpha channels, 16/32-bit integer and
float greyscale, and colour spaces other than RGB. Broken files raise `BadImageError`.

Decompression bombs: given ``max_pixels`` (the data pipeline passes its ``max_image_pixels``,
default `DEFAULT_MAX_IMAGE_PIXELS`), an image's size is read from its header before any pixel is
decoded, and one with more pixels raises `ImageTooLargeError`. PIL's own limit
(``PIL.Image.MAX_IMAGE_PIXELS``: a warning above ~89 Mpx, an error above ~179 Mpx) is then off while
the file is read, so that ours is the one that applies, both ways; without ``max_pixels`` PIL's
check stays as it is.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "BadImageError",
    "ImageTooLargeError",
    "check_pixel_limit",
    "load_rgb",
    "pil_limit_off",
    "read_size",
    "to_rgb",
    "too_large_reason",
]

# 8192 x 8192 = 67 megapixels: about 200 MB decoded as RGB. Real photographs stay below it (a 100 Mpx
# medium-format camera is the exception: raise the limit); a tiny file that claims more is a bomb.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

# Transparent pixels are composited on this background (what a viewer shows on a white page).
BACKGROUND_RGB = (255, 255, 255)

_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_INTEGER_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_OTHER_COLOUR_MODES = {"CMYK", "YCbCr", "LAB", "HSV"}
_EXIF_ORIENTATION = 0x0112
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
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


class ImageTooLargeError(BadImageError):
    """An image whose header declares more pixels than the limit (decoding it could exhaust memory).

    Attributes:
        width: Width from the header.
        height: Height from the header.
        max_pixels: The limit it is above.
    """

    def __init__(self, path: str | os.PathLike[str], width: int, height: int, max_pixels: int) -> None:
        self.width, self.height, self.max_pixels = width, height, max_pixels
        super().__init__(path, too_large_reason(width, height, max_pixels))

    def __reduce__(self):
        return (type(self), (self.path, self.width, self.height, self.max_pixels))


def too_large_reason(width: int, height: int, max_pixels: int) -> str:
    """Why an image of ``width`` x ``height`` is refused under the limit ``max_pixels``."""
    return (
        f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), above the limit of "
        f"{max_pixels / 1e6:.1f} megapixels (max_image_pixels={max_pixels}); raise max_image_pixels "
        "to train on it, or downscale the file"
    )


def check_pixel_limit(
    path: str | os.PathLike[str], size: tuple[int, int], max_pixels: int | None
) -> None:
    """Raise `ImageTooLargeError` when ``size`` (width, height) has more than ``max_pixels`` pixels.

    Args:
        path: The image file, named in the error.
        size: Its width and height.
        max_pixels: The limit; ``None`` checks nothing.
    """
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(path, width, height, max_pixels)


_pil_limit_lock = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: int | None = None


@contextmanager
def pil_limit_off() -> Iterator[None]:
    """Switch off PIL's decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) inside the block.

    Callers check the size themselves (`check_pixel_limit`) before decoding. The check is a PIL
    module global: nested and concurrent blocks (threads) share one switch, restored when the last
    block ends.
    """
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def load_rgb(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode, orient and convert an image file to 8-bit RGB.

    Args:
        path: Image file to read.
        max_pixels: Refuse (from the header, before decoding) an image with more pixels than
            this, in place of PIL's decompression-bomb check; ``None`` leaves PIL's check
            (``PIL.Image.MAX_IMAGE_PIXELS``) to decide.

    Returns:
        A decoded `PIL.Image.Image` in mode ``"RGB"``, rotated/flipped according to its EXIF
        Orientation tag. Transparent areas are composited on white.

    Raises:
        ImageTooLargeError: The header declares more than ``max_pixels`` pixels.
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
        with pil_limit_off() if max_pixels is not None else nullcontext(), Image.open(path) as img:
            check_pixel_limit(path, img.size, max_pixels)  # from the header, before any decoding
            img.load()  # decode every pixel now so truncated files fail here, not mid-training
            oriented = ImageOps.exif_transpose(img)
            return to_rgb(oriented)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can identify") from None
    except BadImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise BadImageError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def read_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open an image and read its ``(width, height)`` (swapped for EXIF rotations) without decoding pixels.

    PIL's decompression-bomb check applies unless the caller is inside `pil_limit_off`.

    Raises:
        BadImageError: The file is not an image, or its header cannot be read.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if _header_orientation(img) in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
                width, height = height, width
            return width, height
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can identify") from None
    except _HEADER_ERRORS as exc:
        reason = f"cannot read image header ({type(exc).__name__}: {exc})"
        raise BadImageError(path, reason) from exc


def _header_orientation(img: Image.Image) -> int:
    # PIL's PNG reader decodes the whole image to find an eXIf chunk after the pixel data; only
    # use one that came before it (camera files are JPEG/TIFF/WebP, whose EXIF is in the header).
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: load_rgb's exif_transpose ignores it as well
        return 1


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
