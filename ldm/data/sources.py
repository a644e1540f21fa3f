"""Find (image, captions, metadata) records in a dataset folder.

Three on-disk layouts are understood, detected in this order:

1. ``metadata.jsonl`` (the Hugging Face ``imagefolder`` convention): one JSON object per line,
   ``{"file_name": "a/b.png", "text": "a caption" or ["caption 1", "caption 2"], ...}``. All other
   keys (``split``, ``label``, ``attributes``, ...) are kept as metadata.
2. A CSV file (``metadata.csv``, or the path given as ``csv_file``) with an image column and a
   caption column; rows naming the same image are merged into one record with several captions.
3. Sidecar captions (the kohya convention): every image ``foo.png`` (searched recursively) with
   ``foo.txt`` or ``foo.caption`` beside it, one caption per non-empty line.

Image paths in metadata files are relative to the dataset root and may not leave it, lexically
(``../``) or through symbolic links (`OutsideDatasetError`, see `ldm.data.links`; the image scan
judges image files, this module the folders it walks and the caption files it reads). A bad line
of a metadata or caption file is a `BadMetadataError` naming file and line, or, with
``on_bad_file="skip"``, a logged and counted skip (`Discovery.skipped`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ldm.data.links import LinkGuard
from ldm.data.metadata import invalid_utf8, read_metadata_csv, read_metadata_jsonl
from ldm.data.records import BadMetadataError, ImageRecord

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUT_HELP",
    "Discovery",
    "detect_format",
    "discover_dataset",
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
    if any(True for _ in _iter_image_files(root, LinkGuard(root))):
        return "sidecar"
    raise FileNotFoundError(
        f"no {JSONL_NAME}, no {CSV_NAME} and no image files found in {str(root)!r}. {LAYOUT_HELP}"
    )


@dataclass
class Discovery:
    """What `discover_dataset` found.

    Attributes:
        records: The usable records, in file order (sorted by path for sidecar folders).
        skipped: ``(where, reason)`` of each bad metadata line, or caption file whose image was
            left out (``where``: the file and line).
        layout: ``"jsonl"``, ``"csv"`` or ``"sidecar"``.
    """

    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str = "sidecar"


def discover_dataset(
    root: str | os.PathLike[str],
    csv_file: str | os.PathLike[str] | None = None,
    image_column: str = "file_name",
    caption_column: str = "text",
    on_bad_file: str = "error",
    follow_symlinks: bool = False,
) -> Discovery:
    """Read every record of a dataset folder, whichever supported layout it uses.

    Args:
        root: Dataset folder.
        csv_file: An explicit CSV file (absolute or relative to ``root``); otherwise the layout is
            detected (metadata.jsonl, then metadata.csv, then sidecar caption files).
        image_column: Key/column holding the image path (with the default, ``image`` is
            also accepted).
        caption_column: Key/column holding the caption (with the default, ``caption`` is
            also accepted).
        on_bad_file: ``"skip"`` leaves out bad metadata lines and images with a bad caption
            file, logging each with its file and line; ``"error"`` raises for the first bad line.
        follow_symlinks: Enter linked folders of a sidecar folder, and read caption files, that
            lead out of ``root`` (each real folder is walked once).

    Raises:
        BadMetadataError: ``on_bad_file="error"`` and a line is bad (naming file, line and fix),
            or every line is bad.
        OutsideDatasetError: A path leads out of ``root`` (whatever ``on_bad_file`` says).
    """
    if on_bad_file not in ("skip", "error"):
        raise ValueError(f"on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    root = Path(root)
    layout = detect_format(root, csv_file)
    skipped: list[tuple[str, str]] = []
    if layout == "jsonl":
        records = read_metadata_jsonl(root / JSONL_NAME, image_column, caption_column, skipped)
    elif layout == "csv":
        path = _resolve_csv(root, csv_file if csv_file is not None else CSV_NAME)
        records = read_metadata_csv(path, image_column, caption_column, skipped)
    else:
        records = read_sidecar_captions(root, skipped, follow_symlinks)
    if skipped and (on_bad_file == "error" or not records):
        where, reason = skipped[0]
        others = len(skipped) - 1
        more = f"; and {others} more" if others else ""
        fix = "nothing usable is left" if not records else "pass on_bad_file='skip' to leave such entries out"
        raise BadMetadataError(where, f"{reason} ({fix}{more})")
    if skipped:
        listing = "\n".join(f"  {where}: {reason}" for where, reason in skipped)
        log.warning("skipped %d bad metadata line%s or caption file%s in %s:\n%s", len(skipped),
                    "s" if len(skipped) > 1 else "", "s" if len(skipped) > 1 else "", root, listing)
    uncaptioned = [r.path for r in records if not r.captions]
    if uncaptioned and layout != "sidecar":  # read_sidecar_captions reports its own
        log.warning(
            "%d of %d images in %s have no caption and will be trained unconditionally "
            "(caption ''), e.g. %s",
            len(uncaptioned), len(records), root, ", ".join(uncaptioned[:_SHOW_FIRST]),
        )
    log.info("found %d images in %s (%s layout)", len(records), root, layout)
    return Discovery(records, skipped, layout)


def discover_records(
    root: str | os.PathLike[str],
    csv_file: str | os.PathLike[str] | None = None,
    image_column: str = "file_name",
    caption_column: str = "text",
    on_bad_file: str = "error",
    follow_symlinks: bool = False,
) -> list[ImageRecord]:
    """The records of `discover_dataset` (same arguments): a bad line raises unless ``on_bad_file="skip"``.

    Returns:
        Records in file order (sorted by path for sidecar folders). Files are not opened here.
    """
    return discover_dataset(root, csv_file, image_column, caption_column, on_bad_file, follow_symlinks).records


def read_sidecar_captions(
    root: str | os.PathLike[str],
    skipped: list[tuple[str, str]] | None = None,
    follow_symlinks: bool = False,
) -> list[ImageRecord]:
    """Collect images with ``.txt`` / ``.caption`` files beside them (kohya convention).

    Every non-empty line of a sidecar is one caption. Images without a sidecar are kept with no
    caption (trained unconditionally) and counted in a warning. Hidden folders are skipped. A linked
    folder is entered when it leads to a place inside ``root`` that is not walked anyway, or with
    ``follow_symlinks``; each real folder is walked once, so link loops end.

    Args:
        root: Dataset folder, searched recursively.
        skipped: Where to append ``(where, reason)`` for each image left out because its caption
            file is bad (not UTF-8, unreadable); ``None`` raises `BadMetadataError` for the first.
        follow_symlinks: Enter linked folders and read linked caption files wherever they lead.

    Raises:
        OutsideDatasetError: Without ``follow_symlinks``, a linked folder or caption file leads
            out of ``root``.
    """
    root = Path(root)
    guard = LinkGuard(root, follow_symlinks)
    records = []
    for image in _iter_image_files(root, guard):
        rel = image.relative_to(root).as_posix()
        try:
            captions = _sidecar_captions(image, rel, guard)
        except BadMetadataError as exc:
            if skipped is None:
                raise
            skipped.append((exc.where, exc.reason))
            continue
        records.append(ImageRecord(rel, captions, {}))
    guard.raise_escapes()
    missing = [r.path for r in records if not r.captions]
    if missing:
        log.warning(
            "%d of %d images in %s have no .txt/.caption file and will be trained "
            "unconditionally (caption ''), e.g. %s",
            len(missing), len(records), root, ", ".join(missing[:_SHOW_FIRST]),
        )
    return records


def _sidecar_captions(image: Path, rel: str, guard: LinkGuard) -> list[str]:
    """The captions in the ``.txt`` / ``.caption`` files of ``image`` (``rel``: its path in the root)."""
    captions: list[str] = []
    for ext in SIDECAR_EXTENSIONS:
        sidecar = image.with_suffix(ext)
        if sidecar.is_file():
            link_reason, _ = guard.check(str(Path(rel).with_suffix(ext)))
            if link_reason is not None:  # a link out of the folder: recorded, refused by guard.raise_escapes
                continue
            captions += [c for c in _read_lines(sidecar, rel) if c not in captions]
    return captions


def _read_lines(path: Path, image: str) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise BadMetadataError(f"caption file {path}", f"cannot read it ({exc}); image {image} left out") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        bad_text = invalid_utf8(line)
        if bad_text is not None:
            raise BadMetadataError(f"caption file {path}, line {number}", f"{bad_text}; image {image} left out")
    return [line.strip() for line in lines if line.strip()]


def _resolve_csv(root: Path, csv_file: str | os.PathLike[str]) -> Path:
    csv_path = Path(csv_file).expanduser()
    return csv_path if csv_path.is_absolute() else root / csv_path


def _iter_image_files(root: Path, guard: LinkGuard) -> Iterator[Path]:
    """Image files under ``root``, sorted, hidden entries left out. A linked folder out of ``root`` is
    entered only with ``guard.follow_symlinks`` (else recorded in ``guard.escapes``); every real
    folder is entered once, so link loops end and no folder's images are listed twice."""
    seen = {guard.real_root}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            folder = os.path.join(dirpath, name)
            real = os.path.realpath(folder)
            if real not in seen and guard.allows(folder, real):
                seen.add(real)
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name
