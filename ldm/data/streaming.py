"""Training from litdata shards written by ``ldm data optimize``: a local directory or a remote URL litdata reads
(``s3://``, ``gs://``, ...), with a bounded local cache, the folder path's transforms and captions, and the same
seeded, resumable, rank- and worker-disjoint order (:mod:`ldm.data.resumable`), shuffled chunk-locally."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from ldm.data.buckets import assign_buckets, data_bucket_sizes
from ldm.data.epoch_plan import item_groups
from ldm.data.dataset import CROP_CHOICES, ItemTransforms, build_transform, caption_dropout_of, caption_index
from ldm.data.images import to_rgb
from ldm.data.resumable import ResumableTrainData

log = logging.getLogger(__name__)

__all__ = ["MissingShardsError", "StreamingImageCaptionDataModule", "StreamingImageCaptionDataset"]


class MissingShardsError(FileNotFoundError):
    """No litdata shards (``index.json``) where a split should be."""


def _join(url: str, part: str) -> str:
    return url.rstrip("/") + "/" + part


class StreamingImageCaptionDataset(Dataset):
    """Items of one split of an ``ldm data optimize`` output, as the folder dataset gives them:
    ``{"image": FloatTensor[3, S, S] in [-1, 1], "text": str, "index": int}``.

    Args:
        url: The split's litdata directory (``.../train``), local or remote.
        image_size: Output height and width.
        crop: ``"center"`` or ``"random"``.
        random_flip: Random horizontal flips.
        train: Random caption per access (else the first).
        cache_dir: Local cache for remote chunks (litdata's default when None).
        max_cache_size: Bound of that cache, e.g. ``"50GB"``.
        buckets: Aspect-ratio bucket sizes ``(height, width)`` to fit each item into (by the sizes ``ldm data
            optimize`` recorded), instead of a square of ``image_size``.
    """

    def __init__(self, url: str, image_size: int = 32, crop: str = "center", random_flip: bool = False, train: bool = True,
                 cache_dir: str | None = None, max_cache_size: str = "50GB",
                 buckets: list[tuple[int, int]] | None = None) -> None:
        from litdata import StreamingDataset

        self.url, self.train, self.cache_dir = url, train, cache_dir
        self.image_size = image_size
        self.transform = build_transform(image_size, crop, random_flip)
        try:
            self.shards = StreamingDataset(url, cache_dir=cache_dir, max_cache_size=max_cache_size, shuffle=False)
        except (FileNotFoundError, ValueError, AssertionError) as error:  # what litdata raises for a missing index
            raise MissingShardsError(url) from error
        self.chunk_sizes = [end - start for start, end in self.shards.region_of_interest]
        self.sizes: list[tuple[int, int]] | None = None
        if buckets:
            self.sizes = [buckets[b] for b in assign_buckets(self._image_sizes(), buckets)]
        self.transforms = ItemTransforms(self.transform, self.sizes, crop, random_flip)

    def _image_sizes(self) -> list[tuple[int, int]]:
        """``(width, height)`` of every item, from the ``ldm_sizes.json`` that ``ldm data optimize`` wrote beside the
        chunks (fetched into the chunk cache for a remote URL)."""
        from litdata.streaming.resolver import _resolve_dir

        from ldm.data.shards import SIZES_FILE

        where = _resolve_dir(self.url)
        if where.path is not None and where.url is None:
            path = Path(where.path) / SIZES_FILE
        else:
            from litdata.streaming.downloader import get_downloader

            import hashlib
            import tempfile

            folder = Path(self.cache_dir or tempfile.gettempdir()) / "ldm-sizes" / hashlib.sha1(self.url.encode()).hexdigest()[:16]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / SIZES_FILE
            try:
                get_downloader(where.url, str(path.parent), []).download_file(_join(where.url, SIZES_FILE), str(path))
            except Exception as error:  # noqa: BLE001 (any storage error: say what is missing)
                raise FileNotFoundError(f"could not fetch {_join(where.url, SIZES_FILE)}: {error}") from error
        if not path.is_file():
            raise FileNotFoundError(f"{self.url} has no {SIZES_FILE}: buckets need the image sizes that 'ldm data optimize' "
                                    "records; re-run it (or train without --data.buckets)")
        sizes = [tuple(s) for s in json.loads(path.read_text())]
        if len(sizes) != len(self):
            raise ValueError(f"{path} lists {len(sizes)} sizes for {len(self)} items; re-run 'ldm data optimize'")
        return sizes

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.shards[index]
        with Image.open(io.BytesIO(bytes(item["image"]))) as img:
            img.load()
            image = to_rgb(ImageOps.exif_transpose(img))
        captions = json.loads(item["captions"])
        text = captions[caption_index(len(captions), self.train)] if captions else ""
        # Every item carries its row's own caption-dropout rate (-1: none) so that batches of mixed rows collate.
        rate = caption_dropout_of(json.loads(item.get("metadata") or "{}"), item.get("path", f"item {index}"))
        return {"image": self.transforms(index, image), "text": text, "index": index, "caption_dropout": rate}


class StreamingImageCaptionDataModule(ResumableTrainData, L.LightningDataModule):
    """Captioned images streamed from litdata shards (``ldm data optimize SRC --out DIR``), as training batches.

    Batches are those of ``ImageCaptionDataModule``. Every rank and DataLoader worker reads a disjoint share of one
    seeded order (chunks shuffled, then items within windows of a few chunks, so each worker keeps few chunks
    open); a run resumed from a checkpoint continues the interrupted epoch batch for batch.

    Args:
        root: The optimize output: a local directory or a URL litdata reads (``s3://bucket/shards``), holding
            ``train/`` and, when there is a validation split, ``val/``.
        image_size: Height and width of training images (shorter side resized, then cropped).
        crop: "center" or "random" crop for training ("center" for validation).
        random_flip: Random horizontal flips for training.
        batch_size: Training batch size (per device).
        val_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory.
        seed: Seed of the training order (see ``ImageCaptionDataModule``).
        cache_dir: Local cache directory for remote chunks (litdata's default when None).
        max_cache_size: Bound of the local chunk cache, e.g. "50GB".
        buckets: Aspect-ratio buckets, as in ``ImageCaptionDataModule`` (assigned from the sizes ``ldm data
            optimize`` records). Batches then come bucket by bucket, shuffled across all chunks rather than
            chunk-locally: give remote data a cache that holds it, or train on local shards.
        bucket_multiple: Bucket sides are multiples of this (the VAE factor x the UNet's downsampling).
        bucket_max_ratio: Widest (and tallest) bucket aspect ratio.
    """

    def __init__(self, root: str, image_size: int = 32, crop: Literal["center", "random"] = "center", random_flip: bool = False,
                 batch_size: int = 64, val_batch_size: int | None = None, num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0, cache_dir: str | None = None, max_cache_size: str = "50GB", buckets: bool = False,
                 bucket_multiple: int = 64, bucket_max_ratio: float = 2.0) -> None:
        super().__init__()
        if crop not in CROP_CHOICES:
            raise ValueError(f"crop must be one of {CROP_CHOICES}, got {crop!r}")
        for name, value in (("image_size", image_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.save_hyperparameters()
        self.root, self.image_size, self.crop, self.random_flip = root, image_size, crop, random_flip
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, int(seed)
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.bucket_sizes = data_bucket_sizes(image_size, bucket_multiple, bucket_max_ratio) if buckets else []
        self.train_dataset: StreamingImageCaptionDataset | None = None
        self.val_dataset: StreamingImageCaptionDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the shards (reading their index only)."""
        if self.train_dataset is not None:
            return
        common = {"image_size": self.image_size, "cache_dir": self.cache_dir, "max_cache_size": self.max_cache_size,
                  "buckets": self.bucket_sizes or None}
        try:
            self.train_dataset = StreamingImageCaptionDataset(_join(self.root, "train"), crop=self.crop, random_flip=self.random_flip,
                                                              train=True, **common)
        except MissingShardsError as error:
            raise FileNotFoundError(f"{self.root} holds no readable shards under train/ ({error.__cause__}); write them with "
                                    "'ldm data optimize SRC --out DIR'") from error
        try:
            self.val_dataset = StreamingImageCaptionDataset(_join(self.root, "val"), train=False, **common)
        except MissingShardsError:
            self.val_dataset = None  # no validation split
        log.info("%s: %d training and %d validation images in shards", self.root, len(self.train_dataset),
                 len(self.val_dataset) if self.val_dataset is not None else 0)

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the seeded, chunk-local, resumable training order."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        dataset = self.train_dataset
        if dataset.sizes is not None:
            return self.planned_loader(dataset, item_groups(dataset), self.batch_size, self.num_workers, self.pin_memory)
        return self.planned_loader(dataset, item_groups(dataset), self.batch_size, self.num_workers, self.pin_memory,
                                   chunk_sizes=dataset.chunk_sizes)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order (an empty list without a validation split)."""
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []
        if self.val_dataset.sizes is not None:  # one bucket per batch, in order; each rank its share
            return self.planned_loader(self.val_dataset, item_groups(self.val_dataset), self.val_batch_size, self.num_workers,
                                       self.pin_memory, validation=True)
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory)
