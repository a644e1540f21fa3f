"""Checks on weights crossing the format boundary: what a reader loads into a module must be floating point where
the module is, and finite; what a writer writes must be finite (a NaN model is refused, not converted)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ldm.nn.configs import ConfigError

__all__ = ["open_safetensors", "read_safetensors", "check_block_count", "check_config_fits", "check_finite_weights", "load_checked"]


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


@contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open(path)``; a damaged, truncated or non-safetensors file raises a ``ValueError`` naming it (also for
    errors while reading tensors inside the ``with`` block), never safetensors' bare "header too large"."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable .safetensors file ({error}): it is damaged or truncated (copy or "
                         "download it again), or not in the safetensors format") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, on the CPU (errors as :func:`open_safetensors`)."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_block_count(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str, keys: str) -> None:
    """Refuse a UNet/VAE config that describes more blocks than ``state`` holds tensors (``num_res_blocks`` 10**9),
    before a key map or a module is built from it; the error names ``source`` and the config's ``keys``."""
    levels = len(config.get("channel_mult") or config.get("ch_mult") or ())
    depth = config.get("transformer_depth", 1)
    depth = max(depth, default=1) if isinstance(depth, (list, tuple)) else depth
    blocks = levels * (int(config.get("num_res_blocks", 1)) + 1) * max(int(depth), 1)
    if blocks > len(state):
        raise ConfigError(keys, f"describe {blocks:,} blocks but the weights hold only {len(state):,} tensors", source)


def check_config_fits(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], source: str,
                      defaulted: Iterable[str] = ()) -> None:
    """Raise unless the module ``build()`` makes takes exactly the tensors of ``state`` (names and shapes). The module
    is built on the meta device, so a config that does not describe its weights allocates nothing.

    Raises:
        ValueError: naming ``source``, the first missing, unexpected and misshapen keys, and the fields the config
            left to their defaults (``defaulted``), the likely culprits.
    """
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except (RuntimeError, ValueError, OverflowError) as error:  # e.g. widths whose tensors overflow a size
        hint = f" (it leaves out {sorted(defaulted)}: defaults used)" if defaulted else ""
        raise ValueError(f"{source} does not describe its weights: the model it describes cannot even be built "
                         f"({type(error).__name__}: {error}){hint}") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        defaulted = sorted(defaulted)
        hint = f"; the config leaves out {defaulted} (defaults used)" if defaulted else ""
        raise ValueError(f"{source} does not describe its weights: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shapes (file vs config) {wrong[:5]} ({len(missing)}/{len(unexpected)}/{len(wrong)} "
                         f"in all){hint}")
