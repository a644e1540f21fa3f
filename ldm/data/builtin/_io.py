"""Atomic file writing for built-in datasets: a crash never leaves a half-written file behind."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["atomic_write_bytes", "save_png", "write_jsonl"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    Args:
        path: Destination file; its folder is created if needed.
        data: File content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(image: Image.Image, path: Path) -> None:
    """Save an image as PNG atomically (same pixels -> same bytes).

    Args:
        image: Image to save.
        path: Destination ``.png`` file.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    atomic_write_bytes(path, buffer.getvalue())


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically.

    Args:
        path: Destination file.
        rows: JSON-serialisable objects.
    """
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode("utf-8"))
