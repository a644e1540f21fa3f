"""The training order of an epoch as a pure function of (seed, epoch): batches, ranks, workers and resume.

Every rank computes the same global list of batches for an epoch: items are shuffled within each group
(one group, or one per aspect-ratio bucket, so that a batch never mixes sizes) and cut into batches; with
several groups, each group's batches are taken ``W`` at a time (one step of ``W`` ranks, all in that group;
leftovers fewer than ``W`` sit the epoch out) and those steps are shuffled together, so every rank runs the
same bucket at the same step. Rank ``r`` of ``W`` takes batches ``r, r + W, ...`` of that list (cut to a
multiple of ``W``, so every rank runs the same number of steps); within a rank, DataLoader worker ``w`` of
``K`` loads the rank's batches ``w, w + K, ...``, which the DataLoader hands out in order.

Resuming in the middle of an epoch is then a number: how many global batches were consumed. A resumed run
skips exactly those and sees the very batches the uninterrupted run would have seen next (on the same world
size; on another, the count is rounded down to a multiple of the new one, re-showing at most ``W - 1``
batches). With ``chunk_sizes`` (streaming shards) the shuffle keeps reads local: chunk order is shuffled,
then items are shuffled within windows of a few consecutive chunks.

What an item draws while it is loaded (the caption among an image's captions, a random crop or flip) comes from the
global torch RNG, which :class:`PlannedBatches` seeds for each batch from ``(seed, epoch, global batch position)``
and restores afterwards: a batch is the same whichever worker loads it, whether the run was resumed, and loading it
leaves the training process's RNG untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

log = logging.getLogger(__name__)

__all__ = ["EpochPlan", "PlannedBatches", "item_groups", "shuffled_order"]

# Multiplier that keeps (seed, epoch, group) streams apart.
_STREAM = 1_000_003
# Last part of the seed of a batch's item draws, keeping them apart from the shuffles' (seed, epoch, group) streams.
_ITEM_DRAWS = 7


def _mixed_seed(*parts: int) -> int:
    seed = 0
    for part in parts:
        seed = (seed * _STREAM + int(part)) % (2**63 - 1)
    return seed


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mixed_seed(*parts))


def shuffled_order(items: Sequence[int], generator: torch.Generator, chunk_sizes: Sequence[int] | None = None,
                   window: int = 4) -> list[int]:
    """``items`` shuffled. With ``chunk_sizes`` (consecutive runs of ``items`` stored together), the chunk order is
    shuffled and items are shuffled within windows of ``window`` consecutive (shuffled) chunks, so a reader keeps
    only a few chunks open at a time."""
    items = list(items)
    if not chunk_sizes:
        return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
    if sum(chunk_sizes) != len(items):
        raise ValueError(f"chunk_sizes add up to {sum(chunk_sizes)}, but there are {len(items)} items")
    starts = [0]
    for size in chunk_sizes:
        starts.append(starts[-1] + size)
    chunks = [items[starts[i] : starts[i + 1]] for i in range(len(chunk_sizes))]
    chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
    out: list[int] = []
    for w in range(0, len(chunks), window):
        pool = [i for chunk in chunks[w : w + window] for i in chunk]
        out += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
    return out


def item_groups(dataset: Any) -> list[list[int]]:
    """Item indices that may share a batch: all of them, or with per-item bucket ``sizes`` (an attribute of the
    dataset, or of a dataset it wraps) those of each size, sizes in ascending order."""
    sizes = getattr(dataset, "sizes", None)
    if sizes is None:
        return [list(range(len(dataset)))]
    by_size: dict[Any, list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    return [by_size[size] for size in sorted(by_size)]


class EpochPlan:
    """The global batch order of every epoch (see the module docstring).

    Args:
        groups: Item indices that may share a batch (one list for square images; one per bucket).
        batch_size: Items per batch.
        seed: Shuffle seed; the order of epoch ``e`` depends on ``(seed, e)`` only.
        world_size: Number of ranks sharing the epoch.
        shuffle: Shuffle items and batches (False: items in order, batches in order).
        drop_last: Drop a group's last incomplete batch when the group holds more than one batch.
        chunk_sizes: Sizes of the storage chunks items come in (their indices consecutive), for local shuffling;
            only with a single group.
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, seed: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, chunk_sizes: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if chunk_sizes is not None and len(groups) != 1:
            raise ValueError("chunk_sizes work with a single group of items")
        self.groups = [list(g) for g in groups if len(g)]
        self.batch_size, self.seed, self.world_size = batch_size, int(seed), world_size
        self.shuffle, self.drop_last, self.chunk_sizes = shuffle, drop_last, chunk_sizes
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """The global list of batches of ``epoch`` (a multiple of ``world_size`` of them)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        steps: list[list[list[int]]] = []  # each step: world_size batches of one group, one per rank
        for g, items in enumerate(self.groups):
            if self.shuffle:
                items = shuffled_order(items, _generator(self.seed, epoch, g), self.chunk_sizes)
            cut = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
            if self.drop_last and len(cut) > 1 and len(cut[-1]) < self.batch_size:
                cut.pop()
            if len(self.groups) > 1:  # a group's leftover batches (fewer than world_size) wait for the next epoch
                cut = cut[: len(cut) - len(cut) % self.world_size]
            steps += [cut[i : i + self.world_size] for i in range(0, len(cut), self.world_size)]
        if self.shuffle and len(self.groups) > 1:
            order = torch.randperm(len(steps), generator=_generator(self.seed, epoch, len(self.groups))).tolist()
            steps = [steps[i] for i in order]
        out = [batch for step in steps for batch in step]
        usable = len(out) - len(out) % self.world_size
        if usable == 0:
            raise ValueError(f"{len(out)} batches of {self.batch_size} cannot give each of {self.world_size} ranks one; "
                             "lower the batch size or use more data")
        self._cache = (epoch, out[:usable])
        return out[:usable]

    def batches_per_rank(self, epoch: int = 0) -> int:
        """Steps per epoch on every rank."""
        return len(self.batches(epoch)) // self.world_size

    def rank_batches(self, epoch: int, rank: int, consumed: int = 0) -> list[list[int]]:
        """The batches rank ``rank`` still has to run in ``epoch`` after ``consumed`` global batches."""
        batches = self.batches(epoch)
        return [batches[i] for i in self.rank_positions(epoch, rank, consumed)]

    def rank_positions(self, epoch: int, rank: int, consumed: int = 0) -> list[int]:
        """Positions in the global list of ``epoch``'s batches of those rank ``rank`` still has to run after
        ``consumed`` global batches."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        if consumed % self.world_size:
            rounded = consumed - consumed % self.world_size
            log.warning("resuming after %d global batches on %d ranks: restarting at batch %d (a multiple of the world size)",
                        consumed, self.world_size, rounded)
            consumed = rounded
        return list(range(consumed + rank, len(self.batches(epoch)), self.world_size))


class PlannedBatches(IterableDataset):
    """Whole batches of a map-style ``dataset`` in an :class:`EpochPlan`'s order, for ``DataLoader(batch_size=None)``.

    Set ``epoch`` and ``consumed`` (global batches already run in that epoch) before iterating; ``__len__`` is the
    full epoch's number of batches per rank, so a resumed epoch still ends where the uninterrupted one does.
    ``collate`` turns a list of items into a batch (``default_collate``). Items are loaded with the global torch
    RNG seeded from ``(plan seed, epoch, batch position)`` and restored after the batch (see the module docstring).
    """

    def __init__(self, dataset: Dataset, plan: EpochPlan, rank: int = 0,
                 collate: Callable[[list[Any]], Any] = default_collate) -> None:
        self.dataset, self.plan, self.rank, self.collate = dataset, plan, rank, collate
        self.epoch, self.consumed = 0, 0

    def __len__(self) -> int:
        return self.plan.batches_per_rank(self.epoch)

    def __iter__(self) -> Iterator[Any]:
        batches = self.plan.batches(self.epoch)
        mine = self.plan.rank_positions(self.epoch, self.rank, self.consumed)
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        for position in mine:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mixed_seed(self.plan.seed, self.epoch, position, _ITEM_DRAWS))
                items = [self.dataset[i] for i in batches[position]]
            yield self.collate(items)
