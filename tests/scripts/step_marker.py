"""Test helper callback (importable as ``step_marker.StepMarker`` with this folder on ``PYTHONPATH``): appends the
global step to a file after every training batch, so a test driving a training subprocess knows how far it got."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl


class StepMarker(pl.Callback):
    """Appends ``global_step`` to ``{path}-rank{R}.txt`` at each training batch end (after a ``sleep`` in seconds)."""

    def __init__(self, path: str, sleep: float = 0.0):
        self.path = path
        self.sleep = sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.sleep)
        with open(Path(f"{self.path}-rank{trainer.global_rank}.txt"), "a") as f:
            f.write(f"{trainer.global_step}\n")


def read_steps(path: str | Path, rank: int = 0) -> list[int]:
    file = Path(f"{path}-rank{rank}.txt")
    return [int(line) for line in file.read_text().split()] if file.exists() else []
