"""A map-style dataset of (image, caption) pairs read from a folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ldm.data.buckets import bucket_transform
from ldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb
from ldm.data.records import ImageRecord
from ldm.data.transforms import CROP_CHOICES, build_transform  # noqa: F401  (re-exported)

__all__ = ["CROP_CHOICES", "ImageCaptionDataset", "ItemTransforms", "build_transform", "caption_index"]

def caption_index(count: int, train: bool) -> int:
    """Which of an image's ``count`` captions one access uses: uniformly random in training mode (the global torch RNG,
    which the training loader seeds per batch from seed, epoch and position), the first in eval mode."""
    if not train or count <= 1:
        return 0
    return int(torch.randint(count, ()).item())


class ItemTransforms:
    """Per item: the square ``transform``, or with ``sizes`` (per item ``(height, width)`` of its aspect-ratio
    bucket) that bucket's resize-and-crop (:func:`ldm.data.buckets.bucket_transform`, built once per size)."""

    def __init__(self, transform: v2.Compose, sizes: Sequence[tuple[int, int]] | None, crop: str, random_flip: bool) -> None:
        self.transform, self.sizes, self.crop, self.random_flip = transform, sizes, crop, random_flip
        self._by_size: dict[tuple[int, int], v2.Compose] = {}

    def __call__(self, index: int, image) -> torch.Tensor:
        if self.sizes is None:
            transform = self.transform
        else:
            size = self.sizes[index]
            if size not in self._by_size:
                self._by_size[size] = bucket_transform(*size, crop=self.crop, random_flip=self.random_flip)
            transform = self._by_size[size]
        out = transform(image).as_subclass(torch.Tensor)
        self.last_original_size = (image.height, image.width)
        self.last_top_left = _crop_step(transform).last_top_left
        return out

    @property
    def last_size_conditioning(self) -> torch.Tensor:
        """SDXL's size micro-conditioning of the last item transformed: ``[original height, original width, crop top,
        crop left]`` (the crop's offset in output pixels), float32."""
        return torch.tensor([*self.last_original_size, *self.last_top_left], dtype=torch.float32)


def _crop_step(transform: v2.Compose) -> Any:
    """The step of a square or bucket transform that crops (and records where)."""
    return next(step for step in transform.transforms if hasattr(step, "last_top_left"))


class ImageCaptionDataset(Dataset):
    """Images with captions, as ``{"image": FloatTensor[3, S, S] in [-1, 1], "text": str,
    "index": int}`` items.

    In training mode each access draws one of the image's captions uniformly from the global torch
    RNG (the training loader seeds it per batch from seed, epoch and batch position, so a resumed run
    draws the same captions); in eval mode the first caption is always used. Images without captions give ``""``.

    Args:
        root: Dataset folder that record paths are relative to.
        records: The images and their captions (e.g. from `discover_records`, after
            `scan_records`).
        image_size: Output height and width in pixels.
        crop: ``"center"`` or ``"random"`` square crop after resizing the shorter side.
        random_flip: Random horizontal flips (off by default: they break "left"/"right" captions).
        train: Training mode (random caption per access) or eval mode (first caption).
        sizes: Per record, the ``(height, width)`` of its aspect-ratio bucket (:mod:`ldm.data.buckets`): the
            image is resized to cover it and cropped to it instead of to a square. None: squares of ``image_size``.
        max_image_pixels: Refuse (``BadImageError``, before decoding) an image with more pixels than this.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        records: Sequence[ImageRecord],
        image_size: int = 32,
        crop: str = "center",
        random_flip: bool = False,
        train: bool = True,
        sizes: Sequence[tuple[int, int]] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.max_image_pixels = max_image_pixels
        self.records = list(records)
        self.image_size = image_size
        self.train = train
        self.transform = build_transform(image_size, crop, random_flip)
        if sizes is not None and len(sizes) != len(self.records):
            raise ValueError(f"sizes has {len(sizes)} entries for {len(self.records)} records")
        self.sizes = None if sizes is None else [tuple(s) for s in sizes]
        self.transforms = ItemTransforms(self.transform, self.sizes, crop, random_flip)
        self.caption_dropout = row_caption_dropout(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, index: int) -> str:
        """Pick the caption for one access: random in training mode, the first in eval mode.

        Args:
            index: Record index.
        """
        captions = self.records[index].captions
        return captions[caption_index(len(captions), self.train)] if captions else ""

    def image(self, index: int) -> torch.Tensor:
        """The transformed image of record ``index`` (``FloatTensor[3, H, W]`` in [-1, 1]), drawing no caption.

        Args:
            index: Record index.
        """
        return self.transforms(index, load_rgb(self.root / self.records[index].path, self.max_image_pixels))

    def size_conditioning(self, index: int) -> torch.Tensor:
        """``[original height, original width, crop top, crop left]`` of record ``index`` under a centre crop (what
        the latent cache stores), from the image file's header (no decoding)."""
        from PIL import Image

        with Image.open(self.root / self.records[index].path) as image:
            width, height = image.size
        if self.sizes is not None:
            offset = centre_crop_offset(height, width, *self.sizes[index])
        else:  # the square transform: the shorter side resized to image_size (torchvision's rounding), then cut
            short, long = sorted((height, width))
            resized_long = int(self.image_size * long / short)
            resized = (self.image_size, resized_long) if height <= width else (resized_long, self.image_size)
            offset = (int(round((resized[0] - self.image_size) / 2.0)), int(round((resized[1] - self.image_size) / 2.0)))
        return torch.tensor([height, width, *offset], dtype=torch.float32)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        image = self.image(index)
        item = {"image": image, "text": self.caption(index), "index": index,
                "size_conditioning": self.transforms.last_size_conditioning}
        if self.caption_dropout is not None:
            item["caption_dropout"] = self.caption_dropout[index]
        return item


def row_caption_dropout(records: Sequence[ImageRecord]) -> list[float] | None:
    """Each record's own caption-dropout rate (:func:`caption_dropout_of` its metadata), or None when no record has
    one (the items then carry no ``caption_dropout``)."""
    if not any("caption_dropout" in r.metadata for r in records):
        return None
    return [caption_dropout_of(r.metadata, r.path) for r in records]


def caption_dropout_of(metadata: dict, where: str) -> float:
    """A data row's own caption-dropout rate: its metadata's ``caption_dropout`` (kohya's per-subset
    ``caption_dropout_rate``), or -1 without one (the model's ``objective.cond_dropout`` applies).

    Raises:
        ValueError: A rate that is not a number in [0, 1], naming ``where`` (the image).
    """
    if "caption_dropout" not in metadata:
        return -1.0
    rate = metadata["caption_dropout"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{where}: caption_dropout={rate!r} in the metadata must be a number from 0 to 1 (the chance "
                         "that a training step drops this image's caption); fix or remove it")
    return float(rate)


def centre_crop_offset(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """``(top, left)`` in output pixels of the centre crop that resizing ``height x width`` to cover ``target_h x
    target_w`` and cropping gives (as :class:`~ldm.data.buckets.CoverCrop` and the square transform cut it)."""
    from ldm.data.buckets import cover_crop_size

    crop_h, crop_w = cover_crop_size(width, height, target_h, target_w)
    top, left = int(round((height - crop_h) / 2)), int(round((width - crop_w) / 2))
    return int(round(top * target_h / crop_h)), int(round(left * target_w / crop_w))
