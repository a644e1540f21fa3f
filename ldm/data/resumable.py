"""Training loaders that resume mid-epoch exactly: what every ldm DataModule mixes in.

The order comes from an :class:`~ldm.data.epoch_plan.EpochPlan` (a function of seed and epoch). The DataModule
counts the training batches the loop actually takes (``on_before_batch_transfer``, after Lightning's and the
workers' prefetching, so nothing fetched but not trained on is counted), saves ``(epoch, global batches
consumed)`` in the checkpoint (``state_dict``; Lightning stores a DataModule's state there), and after
``--ckpt_path`` the first loader iterated in that epoch skips exactly those batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from ldm.data.epoch_plan import EpochPlan, PlannedBatches

log = logging.getLogger(__name__)

__all__ = ["PlannedLoader", "ResumableTrainData", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PlannedLoader(DataLoader):
    """A ``DataLoader`` over :class:`PlannedBatches` that sets the epoch and the batches to skip at each ``iter``."""

    def __init__(self, batches: PlannedBatches, epoch: Callable[[], int], skip: Callable[[int], int], **kwargs: Any) -> None:
        super().__init__(batches, batch_size=None, **kwargs)
        self._epoch, self._skip = epoch, skip

    def __iter__(self) -> Iterator[Any]:
        batches: PlannedBatches = self.dataset  # type: ignore[assignment]
        batches.epoch = self._epoch()
        batches.consumed = self._skip(batches.epoch)
        return super().__iter__()


class ResumableTrainData:
    """Mixin for a ``LightningDataModule``: :meth:`planned_loader` builds the training loader; the hooks below make
    a resumed run continue the interrupted epoch batch for batch. Needs ``self.seed``."""

    seed: int
    _resume: tuple[int, int] | None = None  # (epoch, global batches) to skip when that epoch's loader starts
    _skipped: tuple[int, int] = (-1, 0)  # (epoch, global batches) the running epoch's loader skipped
    _consumed: tuple[int, int] = (-1, 0)  # (epoch, batches this rank took in it since the loader started)
    _iterations = 0  # epochs counted without a Trainer

    def planned_loader(self, dataset: Dataset, groups: Sequence[Sequence[int]], batch_size: int, num_workers: int = 0,
                       pin_memory: bool = False, chunk_sizes: Sequence[int] | None = None,
                       collate: Callable[[list[Any]], Any] = default_collate) -> PlannedLoader:
        """The shuffled training loader of ``dataset``: batches within ``groups``, this rank's share, resumable."""
        rank, world_size = world()
        plan = EpochPlan(groups, batch_size, seed=self.seed, world_size=world_size, chunk_sizes=chunk_sizes)
        return PlannedLoader(PlannedBatches(dataset, plan, rank, collate), self._current_epoch, self._skip_in,
                             num_workers=num_workers, pin_memory=pin_memory)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.current_epoch
        self._iterations += 1
        return self._iterations - 1

    def _skip_in(self, epoch: int) -> int:
        if self._resume is None or self._resume[0] != epoch:
            return 0
        consumed = self._resume[1]
        self._resume = None  # only the first pass over the interrupted epoch skips
        self._skipped = (epoch, consumed)
        log.info("resuming epoch %d after %d global batches", epoch, consumed)
        return consumed

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            epoch, count = self._consumed
            self._consumed = (trainer.current_epoch, (count if epoch == trainer.current_epoch else 0) + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the training data stands: the epoch and the global batches consumed in it (all ranks alike)."""
        _, world_size = world()
        epoch, count = self._consumed
        skipped = self._skipped[1] if self._skipped[0] == epoch else 0
        return {"epoch": epoch, "consumed_batches": skipped + count * world_size, "world_size": world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("epoch", -1) < 0:
            return
        if state.get("seed", self.seed) != self.seed:
            log.warning("the checkpoint's data order used seed %s, this run seed %s: the resumed epoch's order differs",
                        state["seed"], self.seed)
        self._resume = (int(state["epoch"]), int(state["consumed_batches"]))
        self._consumed = (int(state["epoch"]), 0)
