"""Training loaders that resume mid-epoch exactly: what every ldm DataModule mixes in.

The order comes from an :class:`~ldm.data.epoch_plan.EpochPlan` (a function of seed and epoch). The DataModule
counts the training batches the loop actually takes (``on_before_batch_transfer``, after Lightning's and the
workers' prefetching, so nothing fetched but not trained on is counted), saves ``(epoch, global batches
consumed)`` in the checkpoint (``state_dict``; Lightning stores a DataModule's state there), and after
``--ckpt_path`` the first loader iterated in that epoch skips exactly those batches.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from ldm.data.epoch_plan import EpochPlan, PlannedBatches

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is the exact number of
# batches this rank runs (the workers split those batches, they do not each yield them all).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
# Lightning warns that a mid-epoch checkpoint's dataloader "is not resumable" when the loader itself has no state_dict;
# ours resumes through the DataModule's state (above), which the test suite checks batch for batch.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

__all__ = ["PlannedLoader", "ResumableTrainData", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PlannedLoader(DataLoader):
    """A ``DataLoader`` over :class:`PlannedBatches`; each ``iter`` asks ``start()`` for the pass's
    ``(epoch, global batches to skip)`` (workers learn them when they start, so this happens at ``iter``)."""

    def __init__(self, batches: PlannedBatches, start: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(batches, batch_size=None, **kwargs)
        self._start = start

    def __iter__(self) -> Iterator[Any]:
        batches: PlannedBatches = self.dataset  # type: ignore[assignment]
        batches.epoch, batches.consumed = self._start()
        return super().__iter__()


class ResumableTrainData:
    """Mixin for a ``LightningDataModule``: :meth:`planned_loader` builds the training loader; the hooks below make
    a resumed run continue the interrupted epoch batch for batch. Needs ``self.seed``.

    The data epoch is counted here, one per pass over the training loader, not read from the Trainer: a resumed
    run creates its first loader iterator before Lightning has decided whether it continues the interrupted
    epoch or starts the next. So the checkpoint says which: a pass whose ``num_training_batches`` (with
    ``limit_train_batches``) were all taken is saved as "the next epoch, nothing consumed".
    """

    seed: int
    _epoch = -1  # the data epoch of the running (or last) pass
    _skipped = 0  # global batches the running pass skipped (a resumed epoch)
    _taken = 0  # batches this rank took from the running pass
    _resume: tuple[int, int] | None = None  # (epoch, global batches) the next pass continues from

    def planned_loader(self, dataset: Dataset, groups: Sequence[Sequence[int]], batch_size: int, num_workers: int = 0,
                       pin_memory: bool = False, chunk_sizes: Sequence[int] | None = None,
                       collate: Callable[[list[Any]], Any] = default_collate, validation: bool = False) -> PlannedLoader:
        """The shuffled training loader of ``dataset``: batches within ``groups``, this rank's share, resumable.
        ``validation``: batches in order, the last partial ones kept, never skipped (ranks still split them; the
        batches beyond a multiple of the world size are left out)."""
        rank, world_size = world()
        plan = EpochPlan(groups, batch_size, seed=self.seed, world_size=world_size, chunk_sizes=chunk_sizes,
                         shuffle=not validation, drop_last=not validation)
        start = (lambda: (0, 0)) if validation else self._start_pass
        # Its own generator for the workers' base seed, which DataLoader would otherwise draw from the global RNG
        # each pass (a resumed run would then continue that RNG one draw off).
        return PlannedLoader(PlannedBatches(dataset, plan, rank, collate), start, num_workers=num_workers, pin_memory=pin_memory,
                             generator=torch.Generator().manual_seed(self.seed))

    def _start_pass(self) -> tuple[int, int]:
        if self._resume is not None:
            (self._epoch, self._skipped), self._resume = self._resume, None
            log.info("resuming data epoch %d after %d global batches", self._epoch, self._skipped)
        else:
            self._epoch, self._skipped = self._epoch + 1, 0
        self._taken = 0
        return self._epoch, self._skipped

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self._taken += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the training data stands: the data epoch and the global batches consumed in it (all ranks alike)."""
        world_size = world()[1]
        if self._resume is not None:  # restored, not started yet
            epoch, consumed = self._resume
        else:
            epoch, consumed = self._epoch, self._skipped + self._taken * world_size
            trainer = getattr(self, "trainer", None)
            steps = getattr(trainer, "num_training_batches", None)
            if isinstance(steps, int) and steps > 0 and consumed // world_size >= steps:
                epoch, consumed = epoch + 1, 0  # the epoch is over (Lightning resumes into the next one)
        return {"epoch": epoch, "consumed_batches": consumed, "world_size": world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("epoch", -1) < 0:
            return
        if state.get("seed", self.seed) != self.seed:
            log.warning("the checkpoint's data order used seed %s, this run seed %s: the resumed epoch's order differs",
                        state["seed"], self.seed)
        self._resume = (int(state["epoch"]), int(state["consumed_batches"]))
