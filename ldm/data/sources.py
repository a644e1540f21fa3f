"""Find (image, captions, metadata) records in a dataset folder.

Three on-disk layouts are understood, detected in this order:

1. ``metadata.jsonl`` (the Hugging Face ``imagefolder`` convention): one JSON object per line,
   ``{"file_name": "a/b.png", "text": "a caption" or ["caption 1", "caption 2"], ...}``. All other
   keys (``split``, ``label``, ``attributes``, ...) are kept as metadata.
2. A CSV file (``metadata.csv``, or the path given as ``csv_file``) with an image column and a
   caption column; rows naming the same image are merged into one record with several captions.
3. Sidecar captions (the kohya convention): every image ``foo.png`` (searched recursively) with
   ``foo.txt`` or ``foo.caption`` beside it, one caption per non-empty line.

Image paths in metadata files are relative to the dataset root and may not leave it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ldm.data.metadata import read_metadata_csv, read_metadata_jsonl
from ldm.data.records import ImageRecord

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUT_HELP",
    "detect_format",
    "discover_records",
    "read_sidecar_captions",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_EXTENSIONS = (".txt", ".caption")
JSONL_NAME = "metadata.jsonl"
CSV_NAME = "metadata.csv"
_SHOW_FIRST = 5

LAYOUT_HELP = (
    "Supported layouts: (1) metadata.jsonl with lines like "
    '{"file_name": "images/0001.png", "text": "a caption"}; '
    "(2) metadata.csv (or csv_file=...) with columns file_name,text; "
    "(3) image files (png/jpg/jpeg/webp/bmp/gif/tif/tiff) with a foo.txt or foo.caption "
    "caption file beside each foo.png."
)


def detect_format(
    root: str | os.PathLike[str], csv_file: str | os.PathLike[str] | None = None
) -> str:
    """Say which layout a dataset folder uses: ``"jsonl"``, ``"csv"`` or ``"sidecar"``.

    Args:
        root: Dataset folder.
        csv_file: An explicit CSV file (absolute or relative to ``root``); when given it wins.

    Raises:
        FileNotFoundError: ``root`` or ``csv_file`` is missing, or the folder has none of the
            supported layouts.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist. {LAYOUT_HELP}")
    if csv_file is not None:
        if not _resolve_csv(root, csv_file).is_file():
            raise FileNotFoundError(
                f"csv_file {str(csv_file)!r} not found "
                f"(relative paths are looked up in {str(root)!r})"
            )
        return "csv"
    if (root / JSONL_NAME).is_file():
        return "jsonl"
    if (root / CSV_NAME).is_file():
        return "csv"
    if any(True for _ in _iter_image_files(root)):
        return "sidecar"
    raise FileNotFoundError(
        f"no {JSONL_NAME}, no {CSV_NAME} and no image files found in {str(root)!r}. {LAYOUT_HELP}"
    )


def discover_records(
    root: str | os.PathLike[str],
    csv_file: str | os.PathLike[str] | None = None,
    image_column: str = "file_name",
    caption_column: str = "text",
) -> list[ImageRecord]:
    """Read every record of a dataset folder, whichever supported layout it uses.

    Args:
        root: Dataset folder.
        csv_file: An explicit CSV file (absolute or relative to ``root``); otherwise the layout is
            detected (metadata.jsonl, then metadata.csv, then sidecar caption files).
        image_column: Key/column holding the image path (with the default, ``image`` is
            also accepted).
        caption_column: Key/column holding the caption (with the default, ``caption`` is
            also accepted).

    Returns:
        Records in file order (sorted by path for sidecar folders). Files are not opened here.
    """
    root = Path(root)
    layout = detect_format(root, csv_file)
    if layout == "jsonl":
        records = read_metadata_jsonl(root / JSONL_NAME, image_column, caption_column)
    elif layout == "csv":
        path = _resolve_csv(root, csv_file if csv_file is not None else CSV_NAME)
        records = read_metadata_csv(path, image_column, caption_column)
    else:
        records = read_sidecar_captions(root)
    uncaptioned = [r.path for r in records if not r.captions]
    if uncaptioned and layout != "sidecar":  # read_sidecar_captions reports its own
        log.warning(
            "%d of %d images in %s have no caption and will be trained unconditionally "
            "(caption ''), e.g. %s",
            len(uncaptioned), len(records), root, ", ".join(uncaptioned[:_SHOW_FIRST]),
        )
    log.info("found %d images in %s (%s layout)", len(records), root, layout)
    return records


def read_sidecar_captions(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Collect images with ``.txt`` / ``.caption`` files beside them (kohya convention).

    Every non-empty line of a sidecar is one caption. Images without a sidecar are kept with no
    caption (trained unconditionally) and counted in a warning. Hidden folders are skipped.

    Args:
        root: Dataset folder, searched recursively.
    """
    root = Path(root)
    records = []
    for image in _iter_image_files(root):
        captions: list[str] = []
        for ext in SIDECAR_EXTENSIONS:
            sidecar = image.with_suffix(ext)
            if sidecar.is_file():
                captions += [c for c in _read_lines(sidecar) if c not in captions]
        records.append(ImageRecord(image.relative_to(root).as_posix(), captions, {}))
    missing = [r.path for r in records if not r.captions]
    if missing:
        log.warning(
            "%d of %d images in %s have no .txt/.caption file and will be trained "
            "unconditionally (caption ''), e.g. %s",
            len(missing), len(records), root, ", ".join(missing[:_SHOW_FIRST]),
        )
    return records


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption file {str(path)!r} is not valid UTF-8 ({exc.reason})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resolve_csv(root: Path, csv_file: str | os.PathLike[str]) -> Path:
    csv_path = Path(csv_file).expanduser()
    return csv_path if csv_path.is_absolute() else root / csv_path


def _iter_image_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name
