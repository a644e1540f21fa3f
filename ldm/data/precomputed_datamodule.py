"""The LightningDataModule that trains ``LatentDiffusion`` from latents precomputed by ``ldm data encode``."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ldm.data.epoch_plan import item_groups
from ldm.data.precomputed import EMPTY_PROMPT_ID, PrecomputedLatentsDataset, read_info
from ldm.data.resumable import ResumableTrainData

__all__ = ["PrecomputedLatentsDataModule"]

log = logging.getLogger(__name__)


class PrecomputedLatentsDataModule(ResumableTrainData, L.LightningDataModule):
    """Precomputed VAE moments (and text embeddings) from ``ldm data encode SRC --vae MODEL --out DIR``, as batches.

    Batches are dicts: ``moments`` FloatTensor[B, 2C, h, w] (the posterior; the model samples and scales latents
    from it), ``text`` list of B captions, ``index`` LongTensor[B], and ``context`` FloatTensor[B, L, D] when the
    encode wrote text embeddings. No image is decoded or encoded while training. ``LatentDiffusion`` refuses to
    train when its VAE encoder (or frozen text encoder) is not the one recorded here (``encoder_fingerprint``).
    The training order is the folder DataModule's: seeded, each rank its share, resumable mid-epoch. Latents
    encoded with aspect-ratio buckets (``ldm data encode --buckets``) come one bucket per batch, as with
    ``--data.buckets true`` (shuffled across all chunks: ``local_shuffle`` needs a single group of items).

    Args:
        root: The encode output: a local folder or a URL litdata reads (``s3://bucket/latents``).
        batch_size: Training batch size (per device).
        val_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).
        text_embeddings: Serve the precomputed text embeddings as ``context`` (when the encode wrote them); False
            serves captions only and the model runs its text encoder.
        local_shuffle: Shuffle chunk-locally (chunk order, then items within a few chunks), so that each reader
            keeps few chunks open (best for remote storage); False shuffles all items at once, the order of
            ``ImageCaptionDataModule`` with the same seed.
        seed: Seed of the training order (see ``ImageCaptionDataModule``).
        cache_dir: Local cache for remote chunks (litdata's default when None).
        max_cache_size: Bound of that cache, e.g. "50GB".
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        text_embeddings: bool = True,
        local_shuffle: bool = True,
        seed: int = 0,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", 1 if val_batch_size is None else val_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.root = str(root)
        self.batch_size, self.val_batch_size = batch_size, batch_size if val_batch_size is None else val_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, int(seed)
        self.text_embeddings, self.local_shuffle = text_embeddings, local_shuffle
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.info: dict[str, Any] = read_info(self.root)
        self.train_dataset: PrecomputedLatentsDataset | None = None
        self.val_dataset: PrecomputedLatentsDataset | None = None
        self._empty_context: torch.Tensor | None = None

    @property
    def encoder_fingerprint(self) -> str:
        """Fingerprint of the VAE encoder that wrote the moments (``vae_encoder_fingerprint``)."""
        return self.info["encoder_fingerprint"]

    @property
    def text_encoder_fingerprint(self) -> str | None:
        """Fingerprint of the text encoder that wrote the served embeddings; None when none are served."""
        return self.info.get("text_encoder_fingerprint") if self.text_embeddings else None

    @property
    def image_size(self) -> int:
        """Image size the latents were encoded at."""
        return int(self.info["image_size"])

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Training items per aspect-ratio bucket ``(height, width)``, sizes ascending; empty without buckets."""
        self.setup()
        counts = Counter(self.train_dataset.sizes or [])
        return {size: counts[size] for size in sorted(counts)}

    @property
    def empty_context(self) -> torch.Tensor | None:
        """The stored embedding of the empty prompt (for caption dropout), float32; None when none are served."""
        if self.text_encoder_fingerprint is None:
            return None
        if self._empty_context is None:
            self.setup()
            self._empty_context = self.train_dataset.context(self.info.get("empty_prompt_id", EMPTY_PROMPT_ID))
        return self._empty_context

    def setup(self, stage: str | None = None) -> None:
        """Open the chunk indexes of both splits (no item is read).

        Args:
            stage: Lightning stage; the same data serves every stage.
        """
        if self.train_dataset is not None:
            return
        common = {"text_embeddings": self.text_embeddings, "cache_dir": self.cache_dir, "max_cache_size": self.max_cache_size,
                  "info": self.info}
        self.train_dataset = PrecomputedLatentsDataset(self.root, "train", train=True, **common)
        self.val_dataset = PrecomputedLatentsDataset(self.root, "val", train=False, **common)
        if len(self.train_dataset) == 0:
            raise ValueError(f"{self.root} holds no training latents")
        log.info("%s: %d training and %d validation latents (%s)", self.root, len(self.train_dataset), len(self.val_dataset),
                 "with text embeddings" if self.train_dataset.has_context else "captions only")

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the seeded, resumable training order."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        dataset = self.train_dataset
        chunks = dataset.chunk_sizes if self.local_shuffle and dataset.sizes is None else None
        return self.planned_loader(dataset, item_groups(dataset), self.batch_size, self.num_workers, self.pin_memory,
                                   chunk_sizes=chunks)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order (an empty list without a validation split)."""
        if self.val_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if len(self.val_dataset) == 0:
            return []
        if self.val_dataset.sizes is not None:  # one bucket per batch, in order; each rank its share
            return self.planned_loader(self.val_dataset, item_groups(self.val_dataset), self.val_batch_size,
                                       self.num_workers, self.pin_memory, validation=True)
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed))
