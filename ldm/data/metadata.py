"""Readers for metadata files: Hugging Face style ``metadata.jsonl`` and CSV.

Both give one `ImageRecord` per distinct image path, in first-seen order; repeated paths are
merged into one record with several captions. Image paths are checked with `safe_relative_path`
before anything is opened, so a metadata file cannot point outside the dataset folder.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ldm.data.records import ImageRecord, safe_relative_path

__all__ = [
    "CAPTION_COLUMN_ALIASES",
    "IMAGE_COLUMN_ALIASES",
    "read_metadata_csv",
    "read_metadata_jsonl",
]

IMAGE_COLUMN_ALIASES = ("file_name", "image")
CAPTION_COLUMN_ALIASES = ("text", "caption")


def read_metadata_jsonl(
    path: str | os.PathLike[str],
    image_column: str = "file_name",
    caption_column: str = "text",
) -> list[ImageRecord]:
    """Parse a Hugging Face style ``metadata.jsonl``.

    Args:
        path: The JSON-lines file; ``file_name`` values are relative to its folder.
        image_column: Key holding the image path (with the default, ``image`` is also
            accepted).
        caption_column: Key holding a caption string or a list of captions (with the
            default, ``caption`` is also accepted).

    Raises:
        ValueError: A line is not a JSON object, lacks the image key, has a caption that is not a
            string or list of strings, or names a path outside the dataset folder.
    """
    path = Path(path)
    merged = _RecordMerger()
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            image_key = _pick_key(row.keys(), image_column, IMAGE_COLUMN_ALIASES)
            if image_key is None or not isinstance(row[image_key], str):
                raise ValueError(f"{where}: missing string key {image_column!r}")
            caption_key = _pick_key(row.keys(), caption_column, CAPTION_COLUMN_ALIASES)
            captions = _as_caption_list(row.get(caption_key) if caption_key else None, where)
            extra = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
            merged.add(safe_relative_path(row[image_key], where), captions, extra)
    return merged.records()


def read_metadata_csv(
    path: str | os.PathLike[str],
    image_column: str = "file_name",
    caption_column: str = "text",
) -> list[ImageRecord]:
    """Parse a CSV file with one (image, caption) pair per row.

    Rows naming the same image are merged into one record with several captions; other columns
    are kept as string metadata (from the image's first row).

    Args:
        path: The CSV file (UTF-8, with a header row). Image paths in it are relative to the
            dataset folder.
        image_column: Column holding the image path (with the default, ``image`` is also
            accepted).
        caption_column: Column holding the caption (with the default, ``caption`` is also
            accepted).

    Raises:
        ValueError: The image column is missing, or a path is empty or outside the dataset folder.
    """
    path = Path(path)
    merged = _RecordMerger()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        image_key = _pick_key(header, image_column, IMAGE_COLUMN_ALIASES)
        if image_key is None:
            raise ValueError(
                f"{path}: no image column {image_column!r} (columns: {', '.join(header) or 'none'})"
            )
        caption_key = _pick_key(header, caption_column, CAPTION_COLUMN_ALIASES)
        if caption_key is None and caption_column not in CAPTION_COLUMN_ALIASES:
            raise ValueError(
                f"{path}: no caption column {caption_column!r} (columns: {', '.join(header)})"
            )
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            file_name = row.get(image_key) or ""
            caption = (row.get(caption_key) or "").strip() if caption_key else ""
            extra = {k: v for k, v in row.items() if k not in (image_key, caption_key) and k}
            merged.add(safe_relative_path(file_name, where), [caption] if caption else [], extra)
    return merged.records()


class _RecordMerger:
    """Collects records in first-seen order, merging captions of repeated image paths."""

    def __init__(self) -> None:
        self._by_path: dict[str, ImageRecord] = {}

    def add(self, path: str, captions: list[str], metadata: dict[str, Any]) -> None:
        record = self._by_path.get(path)
        if record is None:
            self._by_path[path] = ImageRecord(path, list(captions), dict(metadata))
        else:
            record.captions += [c for c in captions if c not in record.captions]

    def records(self) -> list[ImageRecord]:
        return list(self._by_path.values())


def _pick_key(keys: Iterable[str], preferred: str, aliases: tuple[str, ...]) -> str | None:
    """The key to use: ``preferred`` or, when it is one of the aliases, any other alias."""
    keys = list(keys)
    candidates = (preferred, *aliases) if preferred in aliases else (preferred,)
    for candidate in candidates:
        if candidate in keys:
            return candidate
    return None


def _as_caption_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"{where}: caption must be a string or a list of strings, got {value!r}")
