"""Per-rank safetensors shards of per-item tensors: each rank computes its share, then every rank reads them all.

A folder holds ``shard-RRRRR-of-WWWWW.safetensors`` files, one per rank of the run that wrote it, each with the
``indices`` of its items (``R, R + W, ...``) and their tensors (dim 0 indexed like ``indices``). A complete set
written with any world size is reused as is; files are written under a temporary name and renamed, so a crash never
leaves a shard that looks complete. Used by :mod:`ldm.data.latent_cache`.

Damage after the fact (a disk filling up, a copy cut short, bit rot) is caught before anything is loaded: beside each
shard, ``sums-RRRRR-of-WWWWW.json`` records its size and SHA-256 when it was written, and a shard that differs, or
whose items are not the ones its name promises, is rebuilt (its items computed again, by the rank ``R % world_size``
of this run) with a warning naming it. Shards written before these records existed are checked by opening them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

__all__ = ["build_or_load_shards", "shard_damage"]

ComputeFn = Callable[[list[int]], dict[str, torch.Tensor]]


def build_or_load_shards(
    folder: Path,
    num_items: int,
    compute: ComputeFn,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Return tensors for items ``0..num_items-1`` (dim 0 indexed by item), computing the shards when missing or
    damaged.

    Collective under DDP: every rank calls it; all of them find the same shards missing or damaged.

    Args:
        folder: The shard folder (created when missing).
        num_items: Items in the set (> 0).
        compute: ``compute(indices)`` returns a dict of tensors for those items (the same keys and, per key, the
            same trailing shape for every call).
        rank: This process's rank; it computes items ``rank, rank + world_size, ...``.
        world_size: Number of processes that compute a share.
        barrier: Waits for every rank (called after this rank wrote its shard, when the set was missing or damaged).
        batch_size: Items per ``compute`` call.

    Raises:
        RuntimeError: The shards are still incomplete or damaged after being written (a filesystem that not every
            rank sees, or a full disk), naming the folder and the fix.
    """
    if num_items < 1:
        raise ValueError(f"a shard set needs at least one item, got num_items={num_items}")
    existing = _complete_shard_set(folder)
    if existing is None:
        _write_shard(folder, rank, world_size, num_items, compute, batch_size)
        barrier()
        existing = _complete_shard_set(folder)
        if existing is None:
            raise RuntimeError(f"cache {folder} is incomplete after every rank wrote its shard; is {folder.parent} on a "
                               "filesystem that every rank sees? Point cache_dir at one, or delete the folder and retry")
        _require_intact(existing, num_items, "after every rank wrote its shard")
    else:
        damaged = {path: reason for path in existing if (reason := shard_damage(path, num_items)) is not None}
        if damaged:
            _rebuild(damaged, num_items, compute, rank, world_size, barrier, batch_size)
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


def shard_damage(path: Path, num_items: int) -> str | None:
    """Why the shard at ``path`` (of a set of ``num_items`` items) cannot be used, or None when it is intact.

    Checks the size and SHA-256 recorded when it was written (when there is a record), that safetensors can open it,
    and that it holds exactly the items its name promises, with every tensor's dim 0 matching.
    """
    shard_rank, world = _rank_and_world(path)
    record = _record_path(path)
    try:
        size = path.stat().st_size
        if record.is_file():
            expected = json.loads(record.read_text())
            if size != expected["bytes"]:
                return f"{size} bytes, {expected['bytes']} when written (truncated or overwritten)"
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != expected["sha256"]:
                return "contents changed since written (SHA-256 differs)"
        with safe_open(str(path), framework="pt") as shard:
            keys = set(shard.keys())
            if "indices" not in keys:
                return "no 'indices' tensor"
            indices = shard.get_tensor("indices")
            lengths = {key: shard.get_slice(key).get_shape()[0] for key in keys}
    except Exception as exc:  # noqa: BLE001 (any damage: SafetensorError, OSError, a bad record...)
        return f"cannot be read ({type(exc).__name__}: {exc})"
    if indices.tolist() != list(range(shard_rank, num_items, world)):
        return f"holds items other than those of rank {shard_rank} of {world} in a set of {num_items}"
    uneven = sorted(key for key, n in lengths.items() if n != len(indices))
    if uneven:
        return f"tensors {uneven} do not have one row per item"
    return None


def _rebuild(damaged: dict[Path, str], num_items: int, compute: ComputeFn, rank: int, world_size: int,
             barrier: Callable[[], None], batch_size: int) -> None:
    """Compute the damaged shards again (shard ``R`` by rank ``R % world_size``), then check them."""
    for path, reason in damaged.items():
        log.warning("latent cache shard %s is damaged (%s); rebuilding it", path, reason)
    barrier()  # every rank has judged the old files before any is replaced
    for path in damaged:
        shard_rank, world = _rank_and_world(path)
        if shard_rank % world_size == rank:
            _write_shard(path.parent, shard_rank, world, num_items, compute, batch_size)
    barrier()
    _require_intact(list(damaged), num_items, "after it was rebuilt")
    log.warning("rebuilt %d damaged shard%s in %s", len(damaged), "s" if len(damaged) > 1 else "",
                next(iter(damaged)).parent)


def _require_intact(paths: list[Path], num_items: int, when: str) -> None:
    for path in paths:
        reason = shard_damage(path, num_items)
        if reason is not None:
            raise RuntimeError(f"cache shard {path} is damaged {when} ({reason}); is the disk full, or {path.parent} "
                               "not on a filesystem that every rank sees? Free space or point cache_dir elsewhere, "
                               "delete the folder and retry")


def _write_shard(folder: Path, shard_rank: int, world: int, num_items: int, compute: ComputeFn,
                 batch_size: int) -> None:
    """Compute items ``shard_rank, shard_rank + world, ...`` and write them, with their size and hash, atomically."""
    mine = list(range(shard_rank, num_items, world))
    pieces: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(mine), batch_size):
        for k, v in compute(mine[start : start + batch_size]).items():
            pieces.setdefault(k, []).append(v.detach().cpu())
    folder.mkdir(parents=True, exist_ok=True)
    shard = {k: torch.cat(v) for k, v in pieces.items()}
    shard["indices"] = torch.tensor(mine, dtype=torch.long)
    name = f"shard-{shard_rank:05d}-of-{world:05d}"
    tmp = folder / f".{name}.tmp"
    save_file(shard, str(tmp))
    with open(tmp, "rb") as f:
        record = {"bytes": os.path.getsize(tmp), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    final = folder / f"{name}.safetensors"
    record_tmp = folder / f".{name}.sums.tmp"
    record_tmp.write_text(json.dumps(record) + "\n")
    os.replace(record_tmp, _record_path(final))  # the record first: a shard never stands without its own
    os.replace(tmp, final)
    log.info("cached %d items in %s (shard %d of %d)", len(mine), folder, shard_rank, world)


def _record_path(shard: Path) -> Path:
    return shard.with_name(shard.stem.replace("shard-", "sums-", 1) + ".json")


def _rank_and_world(path: Path) -> tuple[int, int]:
    shard_rank, world = path.stem.removeprefix("shard-").split("-of-")
    return int(shard_rank), int(world)


def _complete_shard_set(folder: Path) -> list[Path] | None:
    """The shard files of the first world size that has all of its shards, else None."""
    if not folder.is_dir():
        return None
    by_world: dict[int, list[Path]] = {}
    for path in folder.glob("shard-*-of-*.safetensors"):
        try:
            _, world = _rank_and_world(path)
        except ValueError:
            continue  # not one of ours
        by_world.setdefault(world, []).append(path)
    for world, paths in sorted(by_world.items()):
        if len(paths) == world:
            return sorted(paths)
    return None
