"""Lightning callbacks of ldm."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class SavePretrained(pl.Callback):
    """At the end of ``fit``, write the model with its ``save_pretrained`` (global rank 0 only).

    Args:
        dirpath: Folder to write (``config.json`` + safetensors weights).
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            path = pl_module.save_pretrained(Path(self.dirpath))
            log.info("saved the trained model to %s", path)
            print(f"Saved the trained model to {path}")
        trainer.strategy.barrier("ldm_save_pretrained")
