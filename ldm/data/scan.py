"""Open every image of a dataset once at set-up, so broken files surface before training starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ldm.data.images import BadImageError, load_rgb
from ldm.data.records import ImageRecord

__all__ = ["ON_BAD_FILE_CHOICES", "scan_records"]

log = logging.getLogger(__name__)

ON_BAD_FILE_CHOICES = ("skip", "error")
_SHOW_REASONS = 3


def scan_records(
    root: str | os.PathLike[str],
    records: list[ImageRecord],
    on_bad_file: str = "skip",
) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """Decode every image once and drop (or refuse) the ones that cannot be read.

    Args:
        root: Dataset folder that record paths are relative to.
        records: Records to check.
        on_bad_file: ``"skip"`` drops unreadable or missing files and logs a warning listing each
            one with its reason; ``"error"`` raises on the first one.

    Returns:
        The readable records (in their original order) and the ``(path, reason)`` pairs skipped.

    Raises:
        BadImageError: ``on_bad_file="error"`` and a file is missing or unreadable.
        ValueError: ``on_bad_file`` is not one of ``"skip"``/``"error"``, or no readable image is
            left.
    """
    if on_bad_file not in ON_BAD_FILE_CHOICES:
        raise ValueError(f"on_bad_file must be one of {ON_BAD_FILE_CHOICES}, got {on_bad_file!r}")
    root = Path(root)
    good: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    for record in records:
        path = root / record.path
        try:
            load_rgb(path).close()
        except BadImageError as exc:
            if on_bad_file == "error":
                raise BadImageError(
                    path, f"{exc.reason} (pass on_bad_file='skip' to leave such files out)"
                ) from exc
            skipped.append((str(path), exc.reason))
            continue
        good.append(record)
    if skipped:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
        log.warning(
            "skipped %d of %d images in %s that could not be read:\n%s",
            len(skipped), len(records), root, listing,
        )
    if not good:
        message = (
            f"no readable images in {str(root)!r}: "
            f"found {len(records)} files, {len(skipped)} bad"
        )
        if skipped:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[:_SHOW_REASONS])
            extra = len(skipped) - _SHOW_REASONS
            more = f"; and {extra} more" if extra > 0 else ""
            message += f" ({reasons}{more})"
        raise ValueError(message)
    return good, skipped
