"""On-disk cache of a training set's VAE posterior moments (and frozen text-encoder outputs), and the dataset that
serves it.

Encoding every image through a frozen autoencoder each epoch is wasted work: the moments are computed once,
written as safetensors shards (:mod:`ldm.data.cache_shards`) and reused across epochs and runs. The folder names
hash everything that determines the result (the encoder's fingerprint, the image files with their sizes and
modification times, the image size and each image's aspect-ratio bucket), so a changed dataset or encoder gets a
new cache instead of stale latents. Under DDP each rank encodes every ``world_size``-th image into its own shard;
after a barrier every rank reads all shards.

Layout under ``cache_dir``:

* ``latents-<key>/shard-*.safetensors``: square images, all of one size;
* ``latents-<key>/<h>x<w>/shard-*.safetensors``: with aspect-ratio buckets, one shard set per bucket size (the
  latents of different buckets differ in shape, so they are never stacked together);
* ``text-<key>/shard-*.safetensors``: the text encoder's output for every distinct caption and the empty prompt.

This module knows no models: it gets ``encode`` callables and the fingerprints of the encoders behind them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ldm.data.cache_shards import build_or_load_shards
from ldm.data.dataset import ImageCaptionDataset
from ldm.data.epoch_plan import item_groups
from ldm.data.fingerprints import file_signature, fingerprint
from ldm.data import resumable

log = logging.getLogger(__name__)

__all__ = ["CachedLatentDataset", "LatentCacheData", "build_latent_cache", "cache_text_embeddings"]

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
# Captions -> context (B, L, D), or (context, pooled (B, P)) for two text encoders (SDXL).
TextEncoderFn = Callable[[list[str]], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


class CachedLatentDataset(Dataset):
    """An :class:`~ldm.data.dataset.ImageCaptionDataset` served from the cache: ``{"moments": FloatTensor[2C, h, w],
    "text": str, "index": int}`` items (plus ``"context": FloatTensor[L, D]``, the chosen caption's embedding, when
    ``contexts`` are given), with the same indices, captions and ``sizes`` as the wrapped dataset. No image is
    decoded.

    Args:
        dataset: The wrapped dataset (its ``caption`` draws the caption, as in training).
        blocks: Moments of the items of each group, stacked: ``blocks[g][j]`` belongs to item ``members[g][j]``
            (one group for square images; one per bucket size, whose shapes differ).
        members: Item indices of each group; together they hold every item of ``dataset`` exactly once.
        contexts: Text embedding by caption (every caption of the dataset and ``""``), or None.
    """

    def __init__(self, dataset: ImageCaptionDataset, blocks: Sequence[torch.Tensor], members: Sequence[Sequence[int]],
                 contexts: dict[str, torch.Tensor] | None = None) -> None:
        if len(blocks) != len(members):
            raise ValueError(f"{len(blocks)} blocks of moments for {len(members)} groups of items")
        n = len(dataset)
        group = torch.full((n,), -1, dtype=torch.long)
        row = torch.zeros(n, dtype=torch.long)
        for g, (block, items) in enumerate(zip(blocks, members)):
            if block.shape[0] != len(items):
                raise ValueError(f"the cache holds {block.shape[0]} items of group {g} but the dataset has {len(items)}")
            items_t = torch.as_tensor(list(items), dtype=torch.long)
            if items_t.numel() and (items_t.min() < 0 or items_t.max() >= n or (group[items_t] >= 0).any()):
                raise ValueError(f"group {g} holds an item index outside 0..{n - 1} or one already in another group")
            group[items_t], row[items_t] = g, torch.arange(len(items))
        if (group < 0).any():
            raise ValueError(f"the cache misses {int((group < 0).sum())} of the dataset's {n} items")
        self.dataset, self.blocks, self.contexts = dataset, list(blocks), contexts
        self._group, self._row = group, row
        self._sizes: dict[int, torch.Tensor] = {}

    @property
    def sizes(self) -> list[tuple[int, int]] | None:
        """Each item's bucket ``(height, width)`` in pixels, as the wrapped dataset's (None: all squares)."""
        return self.dataset.sizes

    def __len__(self) -> int:
        return len(self.dataset)

    def moments(self, index: int) -> torch.Tensor:
        """The cached posterior moments of item ``index``."""
        return self.blocks[int(self._group[index])][int(self._row[index])]

    def size_conditioning(self, index: int) -> torch.Tensor:
        """The item's SDXL size micro-conditioning under the cache's centre crop (read from the image file's header
        once per item)."""
        if index not in self._sizes:
            self._sizes[index] = self.dataset.size_conditioning(index)
        return self._sizes[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        caption = self.dataset.caption(index)
        item: dict[str, Any] = {"moments": self.moments(index), "text": caption, "index": index,
                                "size_conditioning": self.size_conditioning(index)}
        if self.dataset.caption_dropout is not None:
            item["caption_dropout"] = self.dataset.caption_dropout[index]
        if self.contexts is not None:
            embedded = self.contexts[caption]
            if isinstance(embedded, tuple):  # two text encoders (SDXL): tokens and the pooled embedding
                item["context"], item["pooled"] = embedded
            else:
                item["context"] = embedded
        return item


def _shard_groups(dataset: ImageCaptionDataset) -> list[tuple[str | None, list[int]]]:
    """``(subfolder, item indices)`` of each shard set: one for squares (no subfolder), one per bucket size
    (``"<h>x<w>"``), the groups batches are drawn from (:func:`~ldm.data.epoch_plan.item_groups`)."""
    groups = item_groups(dataset)
    if dataset.sizes is None:
        return [(None, groups[0])]
    return [("{}x{}".format(*dataset.sizes[items[0]]), items) for items in groups]


def build_latent_cache(
    dataset: ImageCaptionDataset,
    cache_dir: str | Path,
    encode: ImageEncoder,
    encoder_fingerprint: str,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    encode_text: TextEncoderFn | None = None,
    text_encoder_fingerprint: str | None = None,
    batch_size: int = 64,
) -> CachedLatentDataset:
    """Build (or load) the cache of ``dataset`` under ``cache_dir`` and return the dataset that serves it.

    Collective under DDP: every rank calls it with its ``rank``; each encodes its share, then all read all.

    Args:
        dataset: Training images exactly as they are trained on (centre crop, no flip: the cache holds one
            encoding per image).
        cache_dir: Folder of the cache (shared by all ranks).
        encode: Images ``FloatTensor[B, 3, H, W]`` in [-1, 1] on ``device`` -> moments ``[B, 2C, H/f, W/f]``.
        encoder_fingerprint: Identifies ``encode`` (e.g. :func:`~ldm.data.fingerprints.vae_encoder_fingerprint`
            of the weights it runs with); part of the cache key.
        device: Where ``encode`` wants the images.
        rank: This process's global rank.
        world_size: Number of processes.
        barrier: Waits for every rank.
        encode_text: Captions -> context ``[B, L, D]``; None caches no text embeddings.
        text_encoder_fingerprint: Identifies ``encode_text``; required with it.
        batch_size: Images (captions) per encoder call.
    """
    if (encode_text is None) != (text_encoder_fingerprint is None):
        raise ValueError("give encode_text and text_encoder_fingerprint together (or neither)")
    cache_dir = Path(cache_dir)
    key = fingerprint("latents", dataset.image_size, dataset.sizes,
                      file_signature(dataset.root, [r.path for r in dataset.records]), encoder_fingerprint)
    folder = cache_dir / f"latents-{key}"
    blocks, members = [], []
    for sub, items in _shard_groups(dataset):

        def encode_batch(positions: list[int], items: list[int] = items) -> dict[str, torch.Tensor]:
            images = torch.stack([dataset.image(items[p]) for p in positions]).to(device)
            with torch.no_grad():
                return {"moments": encode(images).float()}

        cached = build_or_load_shards(folder / sub if sub else folder, len(items), encode_batch, rank, world_size,
                                      barrier, batch_size)
        blocks.append(cached["moments"])
        members.append(items)
    contexts = None
    if encode_text is not None:
        captions = sorted({c for r in dataset.records for c in r.captions} | {""})
        contexts = cache_text_embeddings(cache_dir, captions, encode_text, text_encoder_fingerprint, rank, world_size,
                                         barrier, batch_size)
    return CachedLatentDataset(dataset, blocks, members, contexts)


def cache_text_embeddings(cache_dir: str | Path, captions: Sequence[str], encode_text: TextEncoderFn,
                          text_encoder_fingerprint: str, rank: int = 0, world_size: int = 1,
                          barrier: Callable[[], None] = lambda: None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The outputs of ``encode_text`` for ``captions`` (cached under ``cache_dir/text-<key>/``), by caption.

    Args:
        cache_dir: Folder of the cache (shared by all ranks).
        captions: Distinct captions to encode (include ``""`` for caption dropout).
        encode_text: Captions -> context ``[B, L, D]``.
        text_encoder_fingerprint: Identifies ``encode_text``; part of the cache key.
        rank: This process's global rank.
        world_size: Number of processes.
        barrier: Waits for every rank.
        batch_size: Captions per ``encode_text`` call.
    """
    captions = list(captions)
    key = fingerprint("text", captions, text_encoder_fingerprint)

    def encode_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = encode_text([captions[i] for i in indices])
        if isinstance(out, tuple):  # (context, pooled) of two text encoders (SDXL)
            return {"context": out[0].float(), "pooled": out[1].float()}
        return {"context": out.float()}

    cached = build_or_load_shards(Path(cache_dir) / f"text-{key}", len(captions), encode_batch, rank, world_size, barrier,
                                  batch_size)
    if "pooled" in cached:
        return dict(zip(captions, zip(cached["context"], cached["pooled"])))
    return dict(zip(captions, cached["context"]))


def _barrier() -> None:
    """Wait for every rank of the default process group (nothing to wait for without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class LatentCacheData:
    """Mixin for a ``LightningDataModule`` that trains on an :class:`~ldm.data.dataset.ImageCaptionDataset`
    (``self.train_dataset`` after ``setup()``, ``self.crop``, ``self.random_flip``): :meth:`enable_latent_cache`
    makes it serve training batches of cached VAE moments (and text embeddings) instead of images, from the same
    items in the same order (the training loader reads ``cached_train_dataset`` when it is not None)."""

    cached_train_dataset: CachedLatentDataset | None = None

    def enable_latent_cache(
        self,
        cache_dir: str | Path,
        encode: ImageEncoder,
        encoder_fingerprint: str,
        device: torch.device | str = "cpu",
        encode_text: TextEncoderFn | None = None,
        text_encoder_fingerprint: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        barrier: Callable[[], None] | None = None,
        batch_size: int = 64,
    ) -> bool:
        """Serve training batches from an on-disk cache: ``moments`` ``FloatTensor[B, 2C, h, w]`` instead of
        ``image`` (and ``context`` ``FloatTensor[B, L, D]``, the drawn captions' embeddings, with ``encode_text``),
        with ``text`` and ``index`` as before. The cache is built now, or loaded when one with the same key exists
        (see :mod:`ldm.data.latent_cache`); validation batches stay images. Random crops or flips make every epoch's
        image different, so then nothing is cached (a warning says so).

        Collective under DDP: every rank must call it (each encodes its share, then waits for the others).

        Args:
            cache_dir: Folder of the cache, shared by all ranks.
            encode: Images ``FloatTensor[B, 3, H, W]`` in [-1, 1] on ``device`` -> posterior moments
                ``[B, 2C, H/f, W/f]`` (e.g. a frozen VAE's encoder).
            encoder_fingerprint: Identifies ``encode`` (:func:`~ldm.data.fingerprints.vae_encoder_fingerprint` of
                the weights it runs with): another encoder gets another cache.
            device: Where ``encode`` wants the images.
            encode_text: Captions -> context ``[B, L, D]`` (a frozen text encoder); None caches no text.
            text_encoder_fingerprint: Identifies ``encode_text``; required with it.
            rank: This process's global rank; None: that of the default process group (0 without one).
            world_size: Number of processes; None: that of the default process group (1 without one).
            barrier: Waits for every rank; None: ``torch.distributed.barrier`` when a process group is running.
            batch_size: Images (captions) per encoder call while building.

        Returns:
            Whether batches now come from the cache.
        """
        if not encoder_fingerprint:
            raise ValueError("enable_latent_cache needs encoder_fingerprint, a string identifying the encoder (e.g. "
                             "ldm.data.fingerprints.vae_encoder_fingerprint(vae)), so that another encoder gets a new cache")
        self.cached_train_dataset = None
        if getattr(self, "crop", "center") != "center" or getattr(self, "random_flip", False):
            log.warning("latent cache disabled: random crops/flips change the image every epoch (use crop=center and "
                        "random_flip=false to cache)")
            return False
        self.setup("fit")
        dataset = self.train_dataset
        if not isinstance(dataset, ImageCaptionDataset):
            raise TypeError(f"{type(self).__name__}.train_dataset is a {type(dataset).__name__}; the latent cache "
                            "reads ImageCaptionDataset records")
        default_rank, default_world = resumable.world()
        self.cached_train_dataset = build_latent_cache(
            dataset, cache_dir, encode, encoder_fingerprint, device,
            default_rank if rank is None else rank, default_world if world_size is None else world_size,
            barrier or _barrier, encode_text, text_encoder_fingerprint, batch_size,
        )
        return True

    @property
    def empty_context(self) -> torch.Tensor | None:
        """The cached embedding of the empty prompt (for caption dropout); None when no text embeddings are cached
        (or they are SDXL's, whose caption dropout zeroes the embeddings instead)."""
        cached = self.cached_train_dataset
        if cached is None or cached.contexts is None or isinstance(cached.contexts[""], tuple):
            return None
        return cached.contexts[""]
