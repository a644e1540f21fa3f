"""Weights a run does not train, stored in half precision (``frozen_dtype``).

Which of them a checkpoint may leave out, and the check on load, live with the checkpoint reader
(:mod:`ldm.formats.lightning_ckpt`).
"""

from __future__ import annotations

import torch
from torch import nn


def cast_frozen(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Store the parameters of ``modules`` that do not require grad in ``dtype`` (trainable ones stay as they are)."""
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
