"""Aspect-ratio buckets: resolutions of about equal pixel count, image-to-bucket assignment, and the
per-bucket resize-and-crop transform.

Training every image as a centre-cropped square throws away the sides of wide photos and the top
and bottom of tall ones. Buckets instead offer a handful of resolutions with (nearly) the same pixel
count as ``base_size x base_size`` but different aspect ratios; each image goes to the bucket whose
aspect ratio is nearest its own, and is cropped far less. Every batch must come from one bucket
(tensors in a batch share a shape); grouping batches is the batch planner's job, not this file's.

Sizes are ``(height, width)`` tuples throughout, as in tensor shapes; image sizes are
``(width, height)``, as PIL reports them. Nothing here opens an image file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ldm.data.transforms import CROP_CHOICES, build_transform

__all__ = [
    "CoverCrop",
    "data_bucket_sizes",
    "assign_bucket",
    "assign_buckets",
    "bucket_sizes",
    "bucket_transform",
    "compare_with_square",
    "cover_crop_size",
    "group_by_bucket",
    "kept_pixel_fraction",
]

# Two log aspect ratios closer than this count as a tie (float noise, not a real difference).
_TIE_TOLERANCE = 1e-12


def _require_positive_int(value: Any, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive ``int`` (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def bucket_sizes(base_size: int, multiple: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """The bucket resolutions, as ``(height, width)`` tuples, for a ``base_size`` square budget.

    Rule: for each landscape width ``w = base_size, base_size + multiple, ...`` the height is the
    largest multiple of ``multiple`` with ``h * w <= base_size**2``; widths stop once
    ``w / h > max_ratio`` (or ``h`` would be 0). Each landscape bucket is also added transposed
    (portrait), so the list is symmetric under ``(h, w) <-> (w, h)`` and always holds the square
    ``(base_size, base_size)``. Hence every bucket has both sides a multiple of ``multiple``,
    aspect ratio in ``[1 / max_ratio, max_ratio]``, and pixel count in
    ``(base_size**2 - multiple * max(h, w), base_size**2]``: never more pixels than the square
    (so memory per batch never grows), and less than one ``multiple``-strip fewer (about 1-7% fewer
    for base 512 or 1024 with multiple 64).

    ``multiple`` should be the VAE's downsampling factor times the UNet's total downsampling
    (``2 ** (len(channel_mult) - 1)``), so that latents divide evenly through every UNet level:
    8 x 8 = 64 for Stable Diffusion; 4 x 4 = 16 for a tiny f=4 VAE with a three-level UNet.

    Args:
        base_size: Side of the square whose pixel count the buckets match; a multiple of
            ``multiple``.
        multiple: Every side is a multiple of this.
        max_ratio: Largest allowed long-side / short-side ratio (>= 1; 1 gives only the square).

    Returns:
        The buckets, deduplicated and sorted by aspect ratio ``width / height`` from the tallest
        to the widest; the square is in the middle.

    Raises:
        ValueError: ``base_size`` or ``multiple`` not a positive integer, ``base_size`` not a
            multiple of ``multiple``, or ``max_ratio`` below 1 or not finite.
    """
    _require_positive_int(base_size, "base_size")
    _require_positive_int(multiple, "multiple")
    if base_size % multiple:
        raise ValueError(
            f"base_size must be a multiple of multiple so that the square bucket exists, got "
            f"base_size={base_size} and multiple={multiple}"
        )
    is_number = isinstance(max_ratio, (int, float)) and not isinstance(max_ratio, bool)
    if not is_number or not math.isfinite(max_ratio) or max_ratio < 1:
        raise ValueError(f"max_ratio must be a finite number >= 1, got {max_ratio!r}")
    budget = base_size * base_size
    landscape: list[tuple[int, int]] = []
    width = base_size
    while True:
        height = budget // width // multiple * multiple
        if height < multiple or width > max_ratio * height:
            break
        landscape.append((height, width))
        width += multiple
    both = set(landscape) | {(w, h) for h, w in landscape}
    return sorted(both, key=lambda size: (size[1] / size[0], size))


def _log_aspects(sizes: Sequence[tuple[int, int]]) -> list[float]:
    """``log(width / height)`` of each bucket, after checking that the list is usable."""
    if len(sizes) == 0:
        raise ValueError("sizes must hold at least one (height, width) bucket, got an empty list")
    logs = []
    for i, size in enumerate(sizes):
        if len(size) != 2:
            raise ValueError(f"sizes[{i}] must be a (height, width) pair, got {size!r}")
        height, width = size
        _require_positive_int(height, f"sizes[{i}] height")
        _require_positive_int(width, f"sizes[{i}] width")
        logs.append(math.log(width / height))
    return logs


def _nearest(width: int, height: int, logs: Sequence[float]) -> int:
    """Index of the log aspect ratio nearest the image's; ties go to the lowest index."""
    _require_positive_int(width, "image width")
    _require_positive_int(height, "image height")
    target = math.log(width / height)
    best, best_distance = 0, abs(logs[0] - target)
    for i in range(1, len(logs)):
        distance = abs(logs[i] - target)
        if distance < best_distance - _TIE_TOLERANCE:
            best, best_distance = i, distance
    return best


def data_bucket_sizes(image_size: int, multiple: int, max_ratio: float) -> list[tuple[int, int]]:
    """:func:`bucket_sizes` for a DataModule's ``image_size``/``bucket_multiple``/``bucket_max_ratio``, with an error
    that names those arguments."""
    try:
        return bucket_sizes(image_size, multiple, max_ratio)
    except ValueError as error:
        raise ValueError(f"buckets: {error} (data.image_size must be a multiple of data.bucket_multiple)") from error


def assign_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> int:
    """The index in ``sizes`` of the bucket whose aspect ratio is nearest the image's.

    Distance is ``|log(w / h) - log(W / H)|``, so 2:1 and 1:2 are equally far from the square.
    Ties (equal within 1e-12) go to the lowest index, so the answer is deterministic.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        sizes: Buckets as ``(height, width)``, e.g. from `bucket_sizes`.

    Raises:
        ValueError: Empty or malformed ``sizes``, or a non-positive image side.
    """
    return _nearest(width, height, _log_aspects(sizes))


def assign_buckets(image_sizes: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]]) -> list[int]:
    """The bucket index (as in `assign_bucket`) of each image.

    Args:
        image_sizes: ``(width, height)`` of each image, as PIL's ``Image.size``.
        sizes: Buckets as ``(height, width)``.

    Raises:
        ValueError: As `assign_bucket`; the message names the offending image index.
    """
    logs = _log_aspects(sizes)
    assignments = []
    for i, image_size in enumerate(image_sizes):
        try:
            width, height = image_size
            assignments.append(_nearest(width, height, logs))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"image_sizes[{i}] must be a (width, height) pair of positive integers, "
                f"got {image_size!r}: {error}"
            ) from error
    return assignments


def group_by_bucket(assignments: Sequence[int]) -> dict[int, list[int]]:
    """Item indices per bucket: ``{bucket: [item, ...]}`` with buckets ascending and items in order.

    Buckets that no item uses are absent.

    Args:
        assignments: Bucket index of each item, e.g. from `assign_buckets`.

    Raises:
        ValueError: A bucket index that is not a non-negative integer.
    """
    groups: dict[int, list[int]] = {}
    for item, bucket in enumerate(assignments):
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 0:
            raise ValueError(f"assignments[{item}] must be a non-negative bucket index, got {bucket!r}")
        groups.setdefault(bucket, []).append(item)
    return dict(sorted(groups.items()))


def cover_crop_size(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int]:
    """``(crop_height, crop_width)`` in original pixels of the largest region with the target's
    aspect ratio: what survives resizing the image to cover ``target_h x target_w`` and cropping.

    One side is the image's full side; the other is rounded to whole pixels (at least 1).
    """
    for value, name in ((width, "width"), (height, "height"), (target_h, "target_h"), (target_w, "target_w")):
        _require_positive_int(value, name)
    if width * target_h > target_w * height:  # image wider than the target: keep the full height
        crop_w = (2 * height * target_w + target_h) // (2 * target_h)
        return height, min(width, max(1, crop_w))
    crop_h = (2 * width * target_h + target_w) // (2 * target_w)
    return min(height, max(1, crop_h)), width


class CoverCrop(v2.Transform):
    """Resize an image to cover ``(height, width)`` and crop it to exactly that size.

    The scale is ``max(height / h, width / w)``, the smallest that makes both sides at least the
    target. The crop box is computed in original pixels and cut before resizing (bilinear with
    antialiasing), which gives the same picture as resizing first but never builds a huge
    intermediate for an extreme image (a 1 x 4000 strip into a 320 x 192 bucket).

    Args:
        height: Output height in pixels.
        width: Output width in pixels.
        crop: ``"center"``, or ``"random"`` for a uniformly random offset along the cropped side
            (drawn with ``torch.randint``, so DataLoader worker seeding applies).
    """

    def __init__(self, height: int, width: int, crop: str = "center") -> None:
        super().__init__()
        _require_positive_int(height, "height")
        _require_positive_int(width, "width")
        if crop not in CROP_CHOICES:
            raise ValueError(f"crop must be one of {CROP_CHOICES}, got {crop!r}")
        self.height, self.width, self.crop = height, width, crop
        self.last_top_left = (0, 0)  # the last crop's offset in output pixels (SDXL's crop micro-conditioning)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image_h, image_w = F.get_size(flat_inputs[0])
        crop_h, crop_w = cover_crop_size(image_w, image_h, self.height, self.width)
        if self.crop == "random":
            top = int(torch.randint(image_h - crop_h + 1, ()).item())
            left = int(torch.randint(image_w - crop_w + 1, ()).item())
        else:
            top = int(round((image_h - crop_h) / 2))
            left = int(round((image_w - crop_w) / 2))
        self.last_top_left = (int(round(top * self.height / crop_h)), int(round(left * self.width / crop_w)))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        size = [self.height, self.width]
        return self._call_kernel(F.resized_crop, inpt, **params, size=size, antialias=True)


def _to_model_range_steps() -> list[v2.Transform]:
    """The PIL -> ``FloatTensor`` in [-1, 1] steps of `ldm.data.transforms.build_transform`: its steps
    from ``v2.ToImage`` on, taken from it so the two transforms cannot drift apart."""
    steps = list(build_transform(1).transforms)
    starts = [i for i, step in enumerate(steps) if isinstance(step, v2.ToImage)]
    if not starts:
        raise RuntimeError(
            "ldm.data.transforms.build_transform no longer has a v2.ToImage step; update ldm/data/buckets.py"
        )
    return steps[starts[0]:]


def bucket_transform(height: int, width: int, crop: str = "center", random_flip: bool = False) -> v2.Compose:
    """Build the PIL-RGB-image -> ``FloatTensor[3, height, width]`` in [-1, 1] transform of a bucket.

    The image is resized to cover the bucket (see `CoverCrop`) and centre- or randomly cropped,
    optionally flipped, then normalised exactly as `ldm.data.transforms.build_transform` does; for a
    square bucket and a square image the two give the same tensor.

    Args:
        height: Bucket height in pixels.
        width: Bucket width in pixels.
        crop: ``"center"`` or ``"random"`` crop along the side that is too long.
        random_flip: Flip horizontally with probability 0.5 (off by default: it breaks captions
            that say "left" or "right").

    Raises:
        ValueError: Unknown ``crop`` or a non-positive ``height``/``width``.
    """
    steps: list[v2.Transform] = [CoverCrop(height, width, crop)]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps + _to_model_range_steps())


def kept_pixel_fraction(width: int, height: int, target_h: int, target_w: int) -> float:
    """Fraction of the image's area that survives resizing to cover ``target_h x target_w`` and
    cropping: the crop's area mapped back to the original, over the original area.

    Continuous geometry (no pixel rounding): ``min(r, t) / max(r, t)`` with ``r = width / height``
    and ``t = target_w / target_h``; 1.0 when the aspect ratios match, 0.5 for a 2:1 image in a
    square.

    Raises:
        ValueError: A non-positive side.
    """
    for value, name in ((width, "width"), (height, "height"), (target_h, "target_h"), (target_w, "target_w")):
        _require_positive_int(value, name)
    image_ratio, target_ratio = width / height, target_w / target_h
    return min(image_ratio, target_ratio) / max(image_ratio, target_ratio)


def compare_with_square(
    image_sizes: Sequence[tuple[int, int]], base_size: int, sizes: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """How much of a dataset's pixels buckets keep, against cropping everything to the square.

    Args:
        image_sizes: ``(width, height)`` of each image.
        base_size: Side of the square crop (the kept fraction depends only on its shape, 1:1).
        sizes: Buckets as ``(height, width)``, e.g. ``bucket_sizes(base_size)``.

    Returns:
        ``{"num_images": int, "square_kept": float, "bucket_kept": float,
        "bucket_counts": {(height, width): int}}``: the mean `kept_pixel_fraction` with the
        square crop and with each image in its `assign_bucket` bucket, and how many images each
        bucket receives (every bucket listed, in ``sizes`` order, zeros included).

    Raises:
        ValueError: No images, a non-positive ``base_size``, or malformed sizes.
    """
    _require_positive_int(base_size, "base_size")
    if len(image_sizes) == 0:
        raise ValueError("image_sizes must hold at least one (width, height) pair, got none")
    assignments = assign_buckets(image_sizes, sizes)
    square = [kept_pixel_fraction(w, h, base_size, base_size) for w, h in image_sizes]
    bucketed = [kept_pixel_fraction(w, h, *sizes[b]) for (w, h), b in zip(image_sizes, assignments)]
    counts = {tuple(size): 0 for size in sizes}
    for b in assignments:
        counts[tuple(sizes[b])] += 1
    return {
        "num_images": len(image_sizes),
        "square_kept": sum(square) / len(square),
        "bucket_kept": sum(bucketed) / len(bucketed),
        "bucket_counts": counts,
    }
