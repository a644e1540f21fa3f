"""The LightningDataModule that turns a folder of captioned images into training batches."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from ldm.data.builtin import BUILTIN_DATASETS, is_prepared, prepare_builtin
from ldm.data.buckets import assign_buckets, data_bucket_sizes
from ldm.data.epoch_plan import item_groups
from ldm.data.dataset import CROP_CHOICES, ImageCaptionDataset
from ldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit, pil_limit_off, read_size
from ldm.data.latent_cache import LatentCacheData
from ldm.data.manifest import ScanManifest
from ldm.data.records import ImageRecord
from ldm.data.resumable import ResumableTrainData
from ldm.data.scan import (
    ON_BAD_FILE_CHOICES,
    VERIFY_CHOICES,
    default_scan_workers,
    inspect_files,
    scan_dataset,
)
from ldm.data.sources import LAYOUT_HELP, Discovery, discover_dataset
from ldm.data.split import split_records

__all__ = ["ImageCaptionDataModule"]

log = logging.getLogger(__name__)


class ImageCaptionDataModule(ResumableTrainData, LatentCacheData, L.LightningDataModule):
    """Images with captions from a folder (or a built-in dataset), as batches for training.

    Batches are dicts: ``image`` FloatTensor[B, 3, S, S] in [-1, 1], ``text`` list of B
    captions, ``index`` LongTensor[B]. Every rank discovers, scans and splits the data the same
    deterministic way; under DDP each rank takes its share of one seeded global batch order (no sampler
    needed), and a run resumed mid-epoch sees exactly the batches the uninterrupted run would have.
    After :meth:`enable_latent_cache` (which ``LatentDiffusion`` calls when given a ``cache_dir``) training
    batches carry cached VAE ``moments`` (and ``context``) instead of ``image``, for the same items in the
    same order (:mod:`ldm.data.latent_cache`).

    Args:
        root: Dataset folder (with metadata.jsonl, metadata.csv, or .txt/.caption files beside
            the images), or the name of a built-in dataset ("digits", "shapes"). An existing
            folder always wins over a built-in name; a built-in is prepared in
            ``{data_dir}/{root}`` when missing.
        data_dir: Where built-in datasets are written.
        csv_file: A CSV file with image paths and captions (absolute, or relative to ``root``);
            when given it is used instead of auto-detecting the layout.
        image_column: Metadata key/CSV column with the image path relative to ``root``
            (with the default, "image" is also accepted).
        caption_column: Metadata key/CSV column with the caption(s) (with the default, "caption"
            is also accepted).
        image_size: Height and width of training images; the shorter side is resized to it, then
            a square is cropped.
        crop: "center" or "random" crop for training ("center" is always used for validation).
        random_flip: Random horizontal flips for training. Off by default: flips make captions
            that say "left" or "right" wrong.
        val_fraction: Share of images held out for validation, in [0, 1), assigned by a stable
            hash of the file path. Ignored for images whose metadata has a "split" value.
        batch_size: Training batch size (per device).
        val_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).
        persistent_workers: Keep validation workers alive between epochs (only used when num_workers > 0;
            training workers restart each epoch, as they learn the epoch's order when they start).
        on_bad_file: What to do with bad input found at set-up (unreadable, missing or too large
            images, dangling links, bad lines of metadata.jsonl/CSV such as malformed JSON, a NUL
            byte in a path or text that is not UTF-8, caption files that are not UTF-8): "skip"
            leaves each out and logs it with its reason (file and line for metadata), counted in
            ``skipped``; "error" stops at the first. Paths out of the dataset folder (absolute,
            ``../``, symbolic links; see ``follow_symlinks``) are always an error.
        verify: How hard set-up checks each image: "full" decodes every pixel (catches truncated
            files); "header" opens the file and reads its size without decoding (catches
            non-images, much faster); "none" only checks that the file exists and is not empty.
            Results are kept in a manifest (see ``manifest_dir``), so a later start re-checks only
            new or changed files; an entry from a weaker mode does not count for a stronger one.
        scan_workers: Processes that check images at set-up; default min(8, CPU count).
        follow_symlinks: Read symbolic links (files, and folders of a caption-file dataset) that
            lead out of the dataset folder, for datasets assembled from links. Off by default:
            such a link stops set-up with an error listing the links, as a ``../`` path does
            (links within the folder are fine). Either way a link's target must exist and be an
            image (else it is a bad file, see ``on_bad_file``).
        max_image_pixels: Largest image accepted, in pixels (width x height, read from the
            header before anything is decoded); larger ones are bad files (``on_bad_file``).
            Default 8192*8192 = 67 Mpx, about 200 MB decoded. Replaces PIL's decompression-bomb
            limit in both directions. Not checked at set-up with ``verify="none"`` (no header is
            read): such an image then fails when loaded.
        manifest_dir: Folder for the scan manifest. Default: ``.ldm-manifest.json`` in the dataset
            folder, or ``~/.cache/ldm/manifests/`` (``$XDG_CACHE_HOME``) when that folder is not
            writable.
        prepare_data_per_node: Lightning runs ``prepare_data()`` (writing a built-in dataset, and
            the image scan that fills the manifest) on the first process of every node (True) or
            only on global rank 0 (False), while the other ranks wait, then read the manifest in
            ``setup()``. True is safe everywhere: on a filesystem shared by the nodes each node's
            first process scans at the same time and they write the same manifest atomically.
            False scans once for the whole job, but only if every node sees the same dataset
            folder (and ``data_dir``): on a node that does not, every rank would then write the
            built-in dataset and scan the images on its own.
        max_train_samples: Use only the first N training images (for quick runs).
        builtin_options: Options for preparing a built-in dataset, e.g. ``{"image_size": 64,
            "num_images": 5000}`` for "shapes".
        seed: Seed of the training order: epoch ``e`` shuffles by ``(seed, e)`` on every rank alike, and a run
            resumed from a checkpoint continues that order exactly where it stopped.
        buckets: Aspect-ratio buckets: instead of a centre square, each image keeps (about) its aspect
            ratio at (at most) ``image_size**2`` pixels, in the nearest of a few resolutions
            (:func:`ldm.data.buckets.bucket_sizes`); every batch holds one bucket, and the bucket order
            is shuffled by ``seed`` alike on every rank, so DDP batches match in shape.
        bucket_multiple: Bucket sides are multiples of this: the VAE's factor x the UNet's
            downsampling (SD: 8 x 8 = 64); ``image_size`` must be one too.
        bucket_max_ratio: Widest (and tallest) bucket aspect ratio.
    """

    def __init__(
        self,
        root: str = "digits",
        data_dir: str = "data",
        csv_file: str | None = None,
        image_column: str = "file_name",
        caption_column: str = "text",
        image_size: int = 32,
        crop: Literal["center", "random"] = "center",
        random_flip: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        on_bad_file: Literal["skip", "error"] = "skip",
        verify: Literal["full", "header", "none"] = "full",
        scan_workers: int | None = None,
        follow_symlinks: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        manifest_dir: str | None = None,
        prepare_data_per_node: bool = True,
        max_train_samples: int | None = None,
        builtin_options: dict[str, Any] | None = None,
        seed: int = 0,
        buckets: bool = False,
        bucket_multiple: int = 64,
        bucket_max_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        _check_choice("crop", crop, CROP_CHOICES)
        _check_choice("on_bad_file", on_bad_file, ON_BAD_FILE_CHOICES)
        _check_choice("verify", verify, VERIFY_CHOICES)
        if scan_workers is not None and (isinstance(scan_workers, bool) or scan_workers < 1):
            raise ValueError(f"scan_workers must be a positive integer or None, got {scan_workers!r}")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        for name, value in (("image_size", image_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive integer, got {val_batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if max_train_samples is not None and max_train_samples < 1:
            raise ValueError(f"max_train_samples must be positive, got {max_train_samples!r}")
        self.save_hyperparameters()
        self.root = root
        self.data_dir = data_dir
        self.csv_file = csv_file
        self.image_column = image_column
        self.caption_column = caption_column
        self.image_size = image_size
        self.crop = crop
        self.random_flip = random_flip
        self.val_fraction = float(val_fraction)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.on_bad_file = on_bad_file
        self.verify = verify
        self.scan_workers = scan_workers if scan_workers is not None else default_scan_workers()
        self.follow_symlinks = follow_symlinks
        self.max_image_pixels = max_image_pixels
        self.manifest_dir = manifest_dir
        self.prepare_data_per_node = prepare_data_per_node  # read by Lightning's Trainer
        self.max_train_samples = max_train_samples
        self.builtin_options = dict(builtin_options or {})
        self.seed = int(seed)
        self.buckets, self.bucket_multiple, self.bucket_max_ratio = buckets, bucket_multiple, bucket_max_ratio
        self.bucket_sizes: list[tuple[int, int]] = []
        if buckets:
            self.bucket_sizes = data_bucket_sizes(image_size, bucket_multiple, bucket_max_ratio)
        self.dataset_root, self.builtin_name = _resolve_root(root, data_dir)
        self.train_dataset: ImageCaptionDataset | None = None
        self.val_dataset: ImageCaptionDataset | None = None
        self.skipped: list[tuple[str, str]] = []
        self.image_sizes: dict[str, tuple[int, int]] = {}

    def prepare_data(self) -> None:
        """Write the built-in dataset if ``root`` names one and it is not on disk yet, then check
        the images that the scan manifest does not vouch for and update it.

        Lightning runs this on one process per node (or only on global rank 0 when
        ``prepare_data_per_node`` is False) while the other ranks wait, so they find a complete
        manifest in `setup` instead of each decoding every image. Bad files are only recorded
        here; `setup` skips or refuses them on every rank alike.
        """
        if self.builtin_name is not None:
            prepare_builtin(self.builtin_name, self.dataset_root, **self.builtin_options)
        records = self._discover().records
        inspect_files(
            self.dataset_root, [r.path for r in records], self.verify, self.scan_workers,
            self._manifest(), self.follow_symlinks, self.max_image_pixels,
        )

    def setup(self, stage: str | None = None) -> None:
        """Discover the images, drop unreadable ones, and split train/validation.

        Images are checked against the scan manifest: only files it does not vouch for (none
        after `prepare_data`, unless files changed since) are checked here, so this also works
        outside a Trainer. ``image_sizes`` then holds ``(width, height)`` by relative path for
        every readable image whose size the check read (all of them unless ``verify="none"``).

        Args:
            stage: Lightning stage ("fit", "validate", ...); the same data serves every stage.
        """
        if self.train_dataset is not None:
            return
        if self.builtin_name is not None and not is_prepared(self.dataset_root):
            self.prepare_data()  # used outside a Trainer without calling prepare_data() first
        discovery = self._discover()
        scan = scan_dataset(
            self.dataset_root, discovery.records, self.on_bad_file, self.verify, self.scan_workers,
            self._manifest(), self.follow_symlinks, self.max_image_pixels,
        )
        records, self.image_sizes = scan.good, scan.sizes
        self.skipped = discovery.skipped + scan.skipped
        train, val = split_records(records, self.val_fraction)
        if not train:
            raise ValueError(
                f"no training images left in {str(self.dataset_root)!r}: all {len(val)} readable "
                "images are in the validation split (check 'split' metadata or val_fraction)"
            )
        if self.max_train_samples is not None:
            train = train[: self.max_train_samples]
        common = {"root": self.dataset_root, "image_size": self.image_size, "max_image_pixels": self.max_image_pixels}
        self.train_dataset = ImageCaptionDataset(
            records=train, crop=self.crop, random_flip=self.random_flip, train=True,
            sizes=self._bucket_of(train), **common
        )
        self.val_dataset = ImageCaptionDataset(
            records=val, crop="center", train=False, sizes=self._bucket_of(val), **common
        )
        log.info(
            "%s: %d training and %d validation images (%d skipped: unreadable files and bad metadata lines)",
            self.dataset_root, len(train), len(val), len(self.skipped),
        )

    def _bucket_of(self, records: list[ImageRecord]) -> list[tuple[int, int]] | None:
        """Each record's bucket ``(height, width)`` (None without buckets); sizes from the scan, else the header."""
        if not self.buckets:
            return None
        image_sizes = [self.image_sizes.get(r.path) or _header_size(self.dataset_root / r.path, self.max_image_pixels)
                       for r in records]
        return [self.bucket_sizes[b] for b in assign_buckets(image_sizes, self.bucket_sizes)]

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Training images per aspect-ratio bucket ``(height, width)``, sizes ascending; empty without buckets."""
        counts = Counter(getattr(self.train_dataset, "sizes", None) or [])
        return {size: counts[size] for size in sorted(counts)}

    def _discover(self) -> Discovery:
        return discover_dataset(
            self.dataset_root, self.csv_file, self.image_column, self.caption_column, self.on_bad_file,
            self.follow_symlinks,
        )

    def _manifest(self) -> ScanManifest:
        return ScanManifest(self.dataset_root, self.manifest_dir)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches in the seeded, resumable order of :mod:`ldm.data.epoch_plan` (each rank its
        share); the last partial batch is dropped when there is more than one batch."""
        dataset = self._require(self.train_dataset)
        if self.cached_train_dataset is not None:  # the same items, as cached moments (see enable_latent_cache)
            dataset = self.cached_train_dataset
        return self.planned_loader(dataset, item_groups(dataset), self.batch_size, self.num_workers, self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order (an empty list when there is no validation set)."""
        dataset = self._require(self.val_dataset)
        if len(dataset) == 0:
            return []
        if getattr(dataset, "sizes", None) is not None:  # one bucket per batch, in order; each rank its share
            return self.planned_loader(dataset, item_groups(dataset), self.val_batch_size, self.num_workers, self.pin_memory,
                                       validation=True)
        return self._loader(dataset, self.val_batch_size, shuffle=False, drop_last=False)

    def _loader(
        self, dataset: ImageCaptionDataset, batch_size: int, shuffle: bool, drop_last: bool
    ) -> DataLoader:
        extra = {"persistent_workers": self.persistent_workers} if self.num_workers > 0 else {}
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),  # not a draw from the global RNG per pass
            **extra,
        )

    @staticmethod
    def _require(dataset: ImageCaptionDataset | None) -> ImageCaptionDataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset


def _header_size(path: Path, max_image_pixels: int) -> tuple[int, int]:
    """An image's size from its header (``verify="none"`` read none), refusing one above the limit."""
    with pil_limit_off():
        size = read_size(path)
    check_pixel_limit(path, size, max_image_pixels)
    return size


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _resolve_root(root: str, data_dir: str) -> tuple[Path, str | None]:
    """Return (dataset folder, built-in name or None) for the ``root`` argument."""
    path = Path(root).expanduser()
    if path.is_dir():
        return path, None
    if root in BUILTIN_DATASETS:
        return Path(data_dir).expanduser() / root, root
    raise FileNotFoundError(
        f"root {root!r} is neither an existing folder nor a built-in dataset "
        f"(built-in: {', '.join(sorted(BUILTIN_DATASETS))}). {LAYOUT_HELP}"
    )
