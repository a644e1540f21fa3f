"""The record type shared by every dataset layout, and the path-safety rule for metadata files."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ImageRecord", "safe_relative_path"]


@dataclass
class ImageRecord:
    """One image of a dataset.

    Attributes:
        path: Image path relative to the dataset root, with forward slashes.
        captions: Every caption of the image; empty means unconditional (caption "").
        metadata: Any other information from the metadata file (``split``, ``label``, ...).
    """

    path: str
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def safe_relative_path(file_name: str, source: str | os.PathLike[str]) -> str:
    """Normalise an image path from a metadata file, refusing anything outside the dataset root.

    Args:
        file_name: Path as written in the metadata file (relative to the dataset root).
        source: The metadata file (and line), named in the error message.

    Returns:
        The normalised relative path with forward slashes.

    Raises:
        ValueError: The path is empty, absolute, or escapes the root with ``..``.
    """
    name = file_name.strip().replace("\\", "/")
    drive_letter = len(name) >= 2 and name[1] == ":" and name[0].isalpha()
    if not name or name.startswith("/") or drive_letter or os.path.isabs(file_name):
        raise ValueError(
            f"{source}: file_name {file_name!r} must be a path relative to the dataset folder"
        )
    normalised = posixpath.normpath(name)
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise ValueError(f"{source}: file_name {file_name!r} points outside the dataset folder")
    return normalised
