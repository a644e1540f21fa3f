"""Readers for metadata files: Hugging Face style ``metadata.jsonl`` and CSV.

Both give one `ImageRecord` per distinct image path, in first-seen order; repeated paths are
merged into one record with several captions. Image paths are checked with `safe_relative_path`
before anything is opened, so a metadata file cannot point outside the dataset folder.

A bad line (malformed JSON, a missing or unusable key, a path outside the folder or with a NUL
byte, bytes that are not UTF-8) raises `BadMetadataError` naming the file and line; given a
``skipped`` list, the readers instead append ``(where, reason)`` to it and go on with the next line.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ldm.data.records import BadMetadataError, ImageRecord, safe_relative_path

__all__ = [
    "CAPTION_COLUMN_ALIASES",
    "IMAGE_COLUMN_ALIASES",
    "invalid_utf8",
    "read_metadata_csv",
    "read_metadata_jsonl",
]

IMAGE_COLUMN_ALIASES = ("file_name", "image")
CAPTION_COLUMN_ALIASES = ("text", "caption")
# Bytes that are not UTF-8, as Python's "surrogateescape" error handler decodes them.
_UNDECODABLE = re.compile("[\udc80-\udcff]")

Skipped = list[tuple[str, str]]


def invalid_utf8(text: str) -> str | None:
    """Why ``text`` (decoded with ``errors="surrogateescape"``) is not valid UTF-8, or None."""
    found = _UNDECODABLE.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return (f"not valid UTF-8 (byte 0x{byte:02x} at character {found.start() + 1}); re-save the "
            "file as UTF-8")


def read_metadata_jsonl(
    path: str | os.PathLike[str],
    image_column: str = "file_name",
    caption_column: str = "text",
    skipped: Skipped | None = None,
) -> list[ImageRecord]:
    """Parse a Hugging Face style ``metadata.jsonl``.

    Args:
        path: The JSON-lines file; ``file_name`` values are relative to its folder.
        image_column: Key holding the image path (with the default, ``image`` is also
            accepted).
        caption_column: Key holding a caption string or a list of captions (with the
            default, ``caption`` is also accepted).
        skipped: Where to append ``(where, reason)`` for each bad line, which is then left out;
            ``None`` raises for the first one.

    Raises:
        BadMetadataError: (without ``skipped``) A line is not UTF-8 or not a JSON object, lacks
            the image key, has a caption that is not a string or list of strings, or names a path
            outside the dataset folder or with a NUL byte.
    """
    path = Path(path)
    merged = _RecordMerger()
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                merged.add(*_parse_jsonl_row(line, where, image_column, caption_column))
            except BadMetadataError as exc:
                _skip_or_raise(exc, skipped)
    return merged.records()


def _parse_jsonl_row(
    line: str, where: str, image_column: str, caption_column: str
) -> tuple[str, list[str], dict[str, Any]]:
    """One line's (image path, captions, other keys)."""
    bad_text = invalid_utf8(line)
    if bad_text is not None:
        raise BadMetadataError(where, bad_text)
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadMetadataError(where, f"malformed JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise BadMetadataError(where, f"expected a JSON object, got {type(row).__name__}")
    image_key = _pick_key(row.keys(), image_column, IMAGE_COLUMN_ALIASES)
    if image_key is None or not isinstance(row[image_key], str):
        raise BadMetadataError(where, f"missing string key {image_column!r}")
    caption_key = _pick_key(row.keys(), caption_column, CAPTION_COLUMN_ALIASES)
    captions = _as_caption_list(row.get(caption_key) if caption_key else None, where)
    extra = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
    return safe_relative_path(row[image_key], where), captions, extra


def _skip_or_raise(exc: BadMetadataError, skipped: Skipped | None) -> None:
    if skipped is None:
        raise exc
    skipped.append((exc.where, exc.reason))


def read_metadata_csv(
    path: str | os.PathLike[str],
    image_column: str = "file_name",
    caption_column: str = "text",
    skipped: Skipped | None = None,
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
        skipped: Where to append ``(where, reason)`` for each bad row, which is then left out;
            ``None`` raises for the first one.

    Raises:
        ValueError: The image column is missing.
        BadMetadataError: (without ``skipped``) A row is not UTF-8, or its path is empty, outside
            the dataset folder or holds a NUL byte.
    """
    path = Path(path)
    merged = _RecordMerger()
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        bad_header = invalid_utf8(",".join(header))
        if bad_header is not None:
            raise BadMetadataError(f"{path}, line 1 (the header)", bad_header)
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
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                where = f"{path}, line {reader.line_num}"
                _skip_or_raise(BadMetadataError(where, f"malformed CSV ({exc})"), skipped)
                continue
            where = f"{path}, line {reader.line_num}"
            try:
                for value in row.values():
                    bad_text = invalid_utf8(value) if isinstance(value, str) else None
                    if bad_text is not None:
                        raise BadMetadataError(where, bad_text)
                file_name = row.get(image_key) or ""
                caption = (row.get(caption_key) or "").strip() if caption_key else ""
                extra = {k: v for k, v in row.items() if k not in (image_key, caption_key) and k}
                merged.add(safe_relative_path(file_name, where), [caption] if caption else [], extra)
            except BadMetadataError as exc:
                _skip_or_raise(exc, skipped)
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
        value = [value]
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise BadMetadataError(where, f"caption must be a string or a list of strings, got {value!r}")
    for caption in value:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            raise BadMetadataError(where, f"caption {caption!r} is not valid Unicode (a lone surrogate "
                                   "escape)") from None
    return [v.strip() for v in value if v.strip()]
