"""The learning-rate shape of LatentDiffusion training: linear warm-up, then constant, cosine or linear decay."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "constant", final_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimiser ``step`` (0-based).

    Args:
        step: Optimiser steps taken so far.
        warmup_steps: Linear warm-up from 1/warmup_steps to 1 over this many steps (0: none).
        total_steps: The run's last step; a decay reaches ``final_ratio`` there and stays.
        decay: ``constant``, ``cosine`` or ``linear``.
        final_ratio: The multiplier at ``total_steps`` for a decay.
    """
    warmup = max(1, warmup_steps)
    if step < warmup_steps or decay == "constant":
        return min(1.0, (step + 1) / warmup)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return final_ratio + (1 - final_ratio) * shape
