"""Checks on weights crossing the format boundary: what a reader loads into a module must be floating point where
the module is, and finite; what a writer writes must be finite (a NaN model is refused, not converted)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["check_finite_weights", "load_checked"]


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first tensors holding NaN or infinity."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values, e.g. {bad[:3]}; the "
                         "model is broken (re-export it from a good checkpoint)")


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True):
    """``module.load_state_dict(state)`` after checking that every tensor the module holds in floating point comes as
    floating point (not integers, nor float bytes relabelled as integers) and that the weights are finite.

    Raises:
        ValueError: naming ``source`` and the offending keys.
    """
    expected = module.state_dict()
    spec = getattr(module, "encoder_state_spec", {})  # a VAE built without its encoder still takes those weights
    wrong = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()
             and ((k in expected and expected[k].is_floating_point()) or (k in spec and spec[k][1].is_floating_point))]
    if wrong:
        raise ValueError(f"{source}: weights that must be floating point are stored as {wrong[:3]} "
                         f"({len(wrong)} in all); the file is damaged or not a model of this kind")
    check_finite_weights(state, source)
    return module.load_state_dict(state, strict=strict)
