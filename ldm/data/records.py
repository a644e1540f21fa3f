"""The record type shared by every dataset layout, the errors for bad metadata lines and for paths
that leave the dataset folder, and the path-safety rule for metadata files.

A bad line (`BadMetadataError`) may be skipped and counted (``on_bad_file="skip"``); a path that
leaves the dataset folder (`OutsideDatasetError`: absolute, ``../``, or a symbolic link out of it,
see `ldm.data.links`) is always refused, whatever ``on_bad_file`` says.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BadMetadataError", "ImageRecord", "OutsideDatasetError", "safe_relative_path"]


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


class BadMetadataError(ValueError):
    """A line of a metadata or caption file that cannot be used.

    Attributes:
        where: The file and line (``"path/metadata.jsonl, line 3"``), or the file alone.
        reason: What is wrong with it, and the fix where there is one.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.where, self.reason))


class OutsideDatasetError(ValueError):
    """A path that leads out of the dataset folder: absolute, with ``../``, or through a symbolic link.

    Always an error (never skipped): a dataset must not make training read other files.

    Attributes:
        where: The metadata file and line, or the linked file or folder.
        reason: Where it leads, and the fix.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.where, self.reason))


def safe_relative_path(file_name: str, source: str | os.PathLike[str]) -> str:
    """Normalise an image path from a metadata file, refusing anything outside the dataset root.

    Args:
        file_name: Path as written in the metadata file (relative to the dataset root).
        source: The metadata file (and line), named in the error message.

    Returns:
        The normalised relative path with forward slashes.

    Raises:
        OutsideDatasetError: The path is absolute or escapes the root with ``..``.
        BadMetadataError: The path is empty, or holds a NUL byte or text that no file name can
            hold (a lone UTF-16 surrogate).
    """
    if "\0" in file_name:
        raise BadMetadataError(str(source), f"file_name {file_name!r} contains a NUL byte (\\x00), "
                               "which no file name can hold")
    try:
        os.fsencode(file_name)
    except UnicodeEncodeError:
        raise BadMetadataError(str(source), f"file_name {file_name!r} is not valid Unicode (a lone "
                               "surrogate escape)") from None
    name = file_name.strip().replace("\\", "/")
    if not name:
        raise BadMetadataError(str(source), "empty file_name; it must be a path relative to the dataset folder")
    drive_letter = len(name) >= 2 and name[1] == ":" and name[0].isalpha()
    if name.startswith("/") or drive_letter or os.path.isabs(file_name):
        raise OutsideDatasetError(
            str(source), f"file_name {file_name!r} must be a path relative to the dataset folder"
        )
    normalised = posixpath.normpath(name)
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise OutsideDatasetError(str(source), f"file_name {file_name!r} points outside the dataset folder")
    return normalised
