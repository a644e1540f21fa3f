"""Write image grids from a LightningModule: a PNG on disk and, when available, TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image


def log_image_grid(module: pl.LightningModule, name: str, images: torch.Tensor, nrow: int = 8) -> Path | None:
    """Save ``images`` (in [-1, 1]) as ``{log_dir}/{name}/step_{global_step:06d}.png`` and log to TensorBoard.

    Only global rank 0 writes; returns the PNG path there, None elsewhere or when not attached to a Trainer.
    """
    trainer = module._trainer
    if trainer is None or trainer.global_rank != 0 or trainer.sanity_checking:
        return None
    grid = make_grid(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=1)
    # Not trainer.log_dir: under DDP it broadcasts, and only rank 0 gets here.
    logger_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    out_dir = Path(logger_dir or trainer.default_root_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{trainer.global_step:06d}.png"
    save_image(grid, path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(name, grid, trainer.global_step)
    return path


def pad_to_common_size(images: Sequence[torch.Tensor], value: float = -1.0) -> torch.Tensor:
    """One batch from batches ``(B_i, C, H_i, W_i)`` of different sizes: each image centred on a canvas of the largest
    height and width, filled with ``value`` (black for images in [-1, 1])."""
    height, width = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    out = []
    for x in images:
        top, left = (height - x.shape[-2]) // 2, (width - x.shape[-1]) // 2
        canvas = x.new_full((*x.shape[:-2], height, width), value)
        canvas[..., top : top + x.shape[-2], left : left + x.shape[-1]] = x
        out.append(canvas)
    return torch.cat(out)
