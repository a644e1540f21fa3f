"""Per-rank safetensors shards of per-item tensors: each rank computes its share, then every rank reads them all.

A folder holds ``shard-RRRRR-of-WWWWW.safetensors`` files, one per rank of the run that wrote it, each with the
``indices`` of its items and their tensors (dim 0 indexed like ``indices``). A complete set written with any world
size is reused as is; files are written under a temporary name and renamed, so a crash never leaves a shard that
looks complete. Used by :mod:`ldm.data.latent_cache`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

__all__ = ["build_or_load_shards"]


def build_or_load_shards(
    folder: Path,
    num_items: int,
    compute: Callable[[list[int]], dict[str, torch.Tensor]],
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Return tensors for items ``0..num_items-1`` (dim 0 indexed by item), computing the shards when missing.

    Args:
        folder: The shard folder (created when missing).
        num_items: Items in the set (> 0).
        compute: ``compute(indices)`` returns a dict of tensors for those items (the same keys and, per key, the
            same trailing shape for every call).
        rank: This process's rank; it computes items ``rank, rank + world_size, ...``.
        world_size: Number of processes that compute a share.
        barrier: Waits for every rank (called once, after this rank wrote its shard, when the set was missing).
        batch_size: Items per ``compute`` call.
    """
    if num_items < 1:
        raise ValueError(f"a shard set needs at least one item, got num_items={num_items}")
    existing = _complete_shard_set(folder)
    if existing is None:
        mine = list(range(rank, num_items, world_size))
        pieces: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(mine), batch_size):
            for k, v in compute(mine[start : start + batch_size]).items():
                pieces.setdefault(k, []).append(v.detach().cpu())
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
            raise RuntimeError(f"cache {folder} is incomplete after every rank wrote its shard; is {folder.parent} on a "
                               "filesystem that every rank sees? Point cache_dir at one, or delete the folder and retry")
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
    """The shard files of the first world size that has all of its shards, else None."""
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
