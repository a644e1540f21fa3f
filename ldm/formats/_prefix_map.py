"""Rename state-dict keys and module paths by a table of module prefixes (shared by the UNet and VAE key maps)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def rename_by_prefix(
    state_dict: Mapping[str, torch.Tensor],
    prefixes: Mapping[str, str],
    what: str,
    transform: Callable[[str, str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename every key by the longest matching module prefix in ``prefixes``.

    A prefix is a module path ending in ``"."``; the rest of the key is kept. ``transform(old, new,
    tensor)`` may reshape a tensor. Keys that no prefix covers raise ``KeyError`` naming a few.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = rename_path(key, prefixes)
        if new is None:
            unknown.append(key)
            continue
        out[new] = transform(key, new, value) if transform else value
    if unknown:
        raise KeyError(
            f"{len(unknown)} {what} key(s) do not fit this model configuration, e.g. {unknown[:5]}; "
            "check that the configuration matches the checkpoint"
        )
    return out


def rename_path(path: str, prefixes: Mapping[str, str]) -> str | None:
    """``path`` (a module path or a parameter key) renamed by the longest matching prefix; ``None`` if none matches."""
    dotted = path + "."
    pos = len(dotted)
    while (pos := dotted.rfind(".", 0, pos)) > 0:
        target = prefixes.get(dotted[: pos + 1])
        if target is not None:
            return (target + dotted[pos + 1 :])[:-1]
    return None


def invert(prefixes: Mapping[str, str]) -> dict[str, str]:
    """The inverse prefix table (the table must be one-to-one)."""
    inverse = {v: k for k, v in prefixes.items()}
    if len(inverse) != len(prefixes):
        raise AssertionError("prefix table is not one-to-one")
    return inverse
