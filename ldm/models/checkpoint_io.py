"""Training checkpoints that a kill cannot damage or strand, and resuming from the newest one that loads.

Lightning writes a ``.ckpt`` through an fsspec transaction whose temporary file lives in ``$TMPDIR``: a kill
mid-write leaves it there, and on another filesystem the final move is a copy that is not atomic.
:class:`AtomicCheckpointIO` writes beside the target instead (``.NAME.ckpt.tmp-PID``), syncs it and renames it into
place, so a checkpoint is whole or absent; the leftovers of killed runs are removed at the next start.

A kill between two saves of one step (``step=N.ckpt``, then ``last.ckpt``) leaves ``last.ckpt`` one save behind.
:func:`newest_valid_checkpoint` is what ``--ckpt_path last`` resolves to in ``ldm fit``: the checkpoint with the
highest global step among those that load, whatever its name; damaged ones are named in a warning and passed over.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"^\..+\.ckpt\.tmp-\d+$")


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic renames in the checkpoint's own folder (local paths; remote ones
    keep Lightning's behaviour)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_temp_files(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the half-written ``.NAME.ckpt.tmp-PID`` files a killed run left in ``folders``; returns them."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMP_PATTERN.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.warning("removed %d partial checkpoint file(s) left by an interrupted save: %s", len(removed),
                    ", ".join(str(p) for p in removed))
    return removed


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step stored in a Lightning checkpoint; raises if the file does not load (damaged, not a checkpoint)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no global_step/state_dict)")
    return int(ckpt["global_step"])


def newest_valid_checkpoint(folders: Iterable[str | os.PathLike]) -> Path | None:
    """The ``.ckpt`` in ``folders`` with the highest global step that loads (ties: the newest file), or None."""
    best: tuple[int, float, Path] | None = None
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.ckpt")):
            try:
                key = (checkpoint_step(path), path.stat().st_mtime, path)
            except Exception as exc:  # noqa: BLE001  (any failure to load means: not a checkpoint to resume from)
                log.warning("not resuming from %s: it does not load (%s: %s)", path, type(exc).__name__, exc)
                continue
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else best[2]
