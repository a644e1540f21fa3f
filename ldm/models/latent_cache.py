"""On-disk cache of VAE posterior moments (and frozen text-encoder outputs) for a training set.

Encoding every image through the frozen autoencoder each epoch is wasted work; the moments are
computed once, written as safetensors shards under ``cache_dir/<key>/`` and reused across epochs
and runs. The key hashes everything that determines the result (the encoder's weights, the image
files with their sizes and modification times, the image size), so a changed dataset or encoder
gets a new cache instead of stale latents. Under DDP each rank encodes every ``world_size``-th
image into its own shard; after a barrier every rank reads all shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def fingerprint(*parts: object, tensors: Iterable[torch.Tensor] = ()) -> str:
    """A short stable hash of JSON-able ``parts`` and the bytes of ``tensors``."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def vae_encoder_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of what turns images into posterior moments: a KL autoencoder's ``encoder`` and ``quant_conv`` weights.

    Two VAEs with this hash give the same moments, whatever their decoders; ``ldm data encode`` records it and
    ``LatentDiffusion`` compares it with its own VAE's before training on precomputed latents.
    """
    return fingerprint("vae-encoder", tensors=[*vae.encoder.state_dict().values(), *vae.quant_conv.state_dict().values()])


def text_encoder_fingerprint(text_encoder) -> str:
    """Hash of what turns captions into context: a :class:`~ldm.nn.text_encoder.TextEncoder`'s weights, vocabulary,
    hidden layer and sequence length."""
    vocab = sorted(text_encoder.tokenizer.get_vocab().items())
    return fingerprint("text-encoder", text_encoder.layer, text_encoder.max_length, vocab,
                       tensors=list(text_encoder.model.state_dict().values()))


def file_signature(root: Path, paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file: changes when a file is replaced or edited."""
    out = []
    for p in paths:
        st = os.stat(root / p)
        out.append((p, st.st_size, st.st_mtime_ns))
    return out


def build_or_load_shards(
    folder: Path,
    num_items: int,
    compute: Callable[[list[int]], dict[str, torch.Tensor]],
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Return tensors for items ``0..num_items-1`` (dim 0 indexed by item), computing missing shards.

    ``compute(indices)`` returns a dict of tensors for those items. A complete shard set written
    with any world size is reused as is.
    """
    existing = _complete_shard_set(folder)
    if existing is None:
        mine = list(range(rank, num_items, world_size))
        pieces: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(mine), batch_size):
            for k, v in compute(mine[start : start + batch_size]).items():
                pieces.setdefault(k, []).append(v.cpu())
        folder.mkdir(parents=True, exist_ok=True)
        shard = {k: torch.cat(v) for k, v in pieces.items()}
        shard["indices"] = torch.tensor(mine, dtype=torch.long)
        tmp = folder / f".shard-{rank:05d}-of-{world_size:05d}.tmp"
        save_file(shard, str(tmp))
        tmp.rename(folder / f"shard-{rank:05d}-of-{world_size:05d}.safetensors")
        log.info("rank %d cached %d items in %s", rank, len(mine), folder)
        barrier()
        existing = _complete_shard_set(folder)
        if existing is None:
            raise RuntimeError(f"cache {folder} is incomplete after every rank wrote its shard")
    else:
        log.info("reusing the cache in %s", folder)
    merged: dict[str, torch.Tensor] = {}
    for path in existing:
        shard = load_file(str(path))
        idx = shard.pop("indices")
        for k, v in shard.items():
            if k not in merged:
                merged[k] = torch.empty((num_items, *v.shape[1:]), dtype=v.dtype)
            merged[k][idx] = v
    return merged


def _complete_shard_set(folder: Path) -> list[Path] | None:
    if not folder.is_dir():
        return None
    by_world: dict[int, list[Path]] = {}
    for path in folder.glob("shard-*-of-*.safetensors"):
        world = int(path.stem.split("-of-")[1])
        by_world.setdefault(world, []).append(path)
    for world, paths in sorted(by_world.items()):
        if len(paths) == world:
            return sorted(paths)
    return None


class CachedLatentDataset(Dataset):
    """Wraps an image-caption dataset: items carry ``moments`` from the cache instead of ``image``."""

    def __init__(self, dataset: Dataset, moments: torch.Tensor):
        if len(dataset) != moments.shape[0]:
            raise ValueError(f"cache holds {moments.shape[0]} items but the dataset has {len(dataset)}")
        self.dataset = dataset
        self.moments = moments

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        caption = self.dataset.caption(index)  # no image decode: the latents are cached
        return {"moments": self.moments[index], "text": caption, "index": index}


def cache_latents(cache_dir: Path, dataset, image_size: int, vae: torch.nn.Module,
                  encode: Callable[[torch.Tensor], object], strategy) -> CachedLatentDataset:
    """Wrap ``dataset`` (records with ``root``/``records``) so that it serves cached VAE moments.

    ``encode`` maps a batch of images on the strategy's device to a posterior with ``.moments``; the key
    covers the image files, ``image_size`` and the weights of ``vae``'s encoder side.
    """
    key = fingerprint(
        "latents", image_size, file_signature(dataset.root, [r.path for r in dataset.records]),
        tensors=list(vae.encoder.state_dict().values()) + list(vae.quant_conv.state_dict().values()),
    )
    device = strategy.root_device

    def encode_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        images = torch.stack([dataset[i]["image"] for i in indices]).to(device)
        return {"moments": encode(images).moments.float()}

    cached = build_or_load_shards(cache_dir / f"latents-{key}", len(dataset), encode_batch, strategy.global_rank,
                                  strategy.world_size, lambda: strategy.barrier("ldm_latent_cache"))
    return CachedLatentDataset(dataset, cached["moments"])


def cache_text_embeddings(cache_dir: Path, dataset, text_encoder, strategy) -> dict[str, torch.Tensor]:
    """Frozen text-encoder outputs of every caption of ``dataset`` (and the empty prompt), by caption."""
    captions = sorted({c for r in dataset.records for c in r.captions} | {""})
    key = fingerprint("text", captions, text_encoder.layer, tensors=list(text_encoder.state_dict().values()))
    text_encoder.to(strategy.root_device)

    def encode_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"context": text_encoder.encode([captions[i] for i in indices]).float()}

    cached = build_or_load_shards(cache_dir / f"text-{key}", len(captions), encode_batch, strategy.global_rank,
                                  strategy.world_size, lambda: strategy.barrier("ldm_text_cache"))
    return dict(zip(captions, cached["context"]))
