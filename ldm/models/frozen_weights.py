"""Weights a fine-tune does not train: stored in half precision, left out of checkpoints, checked on load.

A fine-tune (``LatentDiffusion(init_from=...)``) re-reads its frozen weights from ``init_from``, so its
Lightning checkpoints need only what trains (a LoRA checkpoint: the adapters and their optimiser state).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def cast_frozen(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Store the parameters of ``modules`` that do not require grad in ``dtype`` (trainable ones stay as they are)."""
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)


def frozen_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of ``module`` other than trainable parameters and top-level buffers (e.g. a scaling factor)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k for k in module.state_dict() if k not in trainable and "." in k}


def check_only_frozen_missing(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                              restorable: set[str] | None = None) -> None:
    """Raise unless ``state`` holds every weight of ``module`` other than ``restorable`` (default: its frozen
    weights) and nothing it lacks.

    Raises:
        ValueError: naming the missing trained keys and the unexpected ones.
    """
    expected = set(module.state_dict())
    restorable = frozen_state_keys(module) if restorable is None else restorable
    not_frozen = (expected - set(state)) - restorable
    unexpected = set(state) - expected
    if not_frozen or unexpected:
        raise ValueError(f"{source} does not fit this model: missing trained weights {sorted(not_frozen)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
