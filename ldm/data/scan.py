"""Check every image of a dataset at set-up, so broken files surface before training starts.

How hard each file is checked is the ``verify`` mode: ``"full"`` decodes every pixel (what
training will do), ``"header"`` opens the file and reads its size without decoding pixels (catches
non-images and most damage, not a truncated pixel stream), ``"none"`` only checks that the file
exists, is a regular file and is not empty. Checks run in ``workers`` processes, and with a
`ScanManifest` their results are kept so that the next start only checks new or changed files.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm.data.images import BadImageError, load_rgb
from ldm.data.manifest import VERIFY_CHOICES, FileEntry, ScanManifest
from ldm.data.records import ImageRecord

__all__ = [
    "ON_BAD_FILE_CHOICES",
    "VERIFY_CHOICES",
    "ScanResult",
    "check_image",
    "default_scan_workers",
    "inspect_files",
    "scan_dataset",
    "scan_records",
]

log = logging.getLogger(__name__)

ON_BAD_FILE_CHOICES = ("skip", "error")
_SHOW_REASONS = 3
_MIN_FILES_PER_WORKER = 32  # fewer files than this per worker are checked in this process
_MAX_CHUNK = 256
_EXIF_ORIENTATION = 0x0112
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Outcome = FileEntry | str  # a check's entry, or the reason a file could not even be checked
CheckResult = tuple[str | None, int | None, int | None]  # (reason or None, width, height)


@dataclass
class ScanResult:
    """The images of a dataset that can be used, and what was left out.

    Attributes:
        good: The readable records, in their original order.
        skipped: ``(path, reason)`` for each left-out record, ``path`` joined to the root.
        sizes: ``(width, height)`` of readable images by relative path, where the check (or the
            manifest) knows it (not for ``verify="none"`` checks).
        checked: How many files were checked now rather than answered by the manifest.
    """

    good: list[ImageRecord]
    skipped: list[tuple[str, str]]
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    checked: int = 0


def default_scan_workers() -> int:
    """The default number of check processes: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def check_image(
    path: str | os.PathLike[str], verify: str = "full"
) -> tuple[int | None, int | None]:
    """Check one image file as hard as ``verify`` says.

    Args:
        path: Image file.
        verify: ``"full"`` (decode every pixel, as training will), ``"header"`` (open and read the
            size only) or ``"none"`` (the file exists, is regular and not empty).

    Returns:
        ``(width, height)`` after EXIF orientation, or ``(None, None)`` for ``verify="none"``.

    Raises:
        BadImageError: The file fails the check.
        ValueError: ``verify`` is not one of `VERIFY_CHOICES`.
    """
    _check_verify(verify)
    if verify == "full":
        with load_rgb(path) as img:
            return img.size
    info = _stat_file(path)
    if isinstance(info, str):
        raise BadImageError(path, info)
    if verify == "none":
        return None, None
    return _read_header(path)


def inspect_files(
    root: str | os.PathLike[str],
    paths: Sequence[str],
    verify: str = "full",
    workers: int = 1,
    manifest: ScanManifest | None = None,
) -> tuple[dict[str, Outcome], int]:
    """Check files, reusing and then updating a manifest, without judging the outcome.

    Every file is stat'ed; one whose size and mtime match a manifest entry of at least the asked
    ``verify`` strength is not opened again. The others are checked (in ``workers`` processes),
    and the manifest is rewritten when anything differs from what it held: new or changed files,
    files that disappeared, or a manifest that was missing or unreadable.

    Args:
        root: Dataset folder that ``paths`` are relative to.
        paths: Relative image paths (forward slashes); duplicates are checked once.
        verify: ``"full"``, ``"header"`` or ``"none"`` (see `check_image`).
        workers: Check processes (1 checks in this process).
        manifest: Where earlier results are read and these are written; ``None`` checks every
            file and stores nothing.

    Returns:
        For each path, its `FileEntry` (``entry.reason`` is ``None`` when readable) or, for a file
        that is missing, not a regular file or empty, that reason; and how many files were checked.
    """
    _check_verify(verify)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    root = Path(root)
    stored = manifest.load() if manifest is not None else {}
    outcomes: dict[str, Outcome] = {}
    pending: list[tuple[str, int, int]] = []
    known = 0
    for rel in dict.fromkeys(paths):
        info = _stat_file(root / rel)
        if isinstance(info, str):
            outcomes[rel] = info
            continue
        entry = stored.get(rel)
        if entry is not None and entry.satisfies(info.st_size, info.st_mtime_ns, verify):
            outcomes[rel] = entry
            known += 1
        else:
            pending.append((rel, info.st_size, info.st_mtime_ns))
    if pending:
        started = time.perf_counter()
        log.info(
            "checking %d of %d images in %s (verify=%s, %d worker%s; %d known from the manifest)",
            len(pending), len(outcomes) + len(pending), root, verify, workers,
            "s" if workers > 1 else "", known,
        )
        results = _check_files(root, [rel for rel, _, _ in pending], verify, workers)
        for (rel, size, mtime_ns), (reason, width, height) in zip(pending, results):
            outcomes[rel] = FileEntry(size, mtime_ns, verify, reason, width, height)
        log.info("checked %d images in %.1f s", len(pending), time.perf_counter() - started)
    if manifest is not None:
        keep = {rel: e for rel, e in outcomes.items() if isinstance(e, FileEntry)}
        for rel, entry in stored.items():  # other datasets' files in the same folder (a 2nd CSV)
            if rel not in outcomes and _unchanged(root / rel, entry):
                keep[rel] = entry
        if keep != stored:
            manifest.save(keep)
    return outcomes, len(pending)


def scan_dataset(
    root: str | os.PathLike[str],
    records: Sequence[ImageRecord],
    on_bad_file: str = "skip",
    verify: str = "full",
    workers: int = 1,
    manifest: ScanManifest | None = None,
) -> ScanResult:
    """Check every record's image and drop (or refuse) the ones that cannot be used.

    Args:
        root: Dataset folder that record paths are relative to.
        records: Records to check.
        on_bad_file: ``"skip"`` drops unreadable or missing files and logs a warning listing each
            one with its reason; ``"error"`` raises for the first one (in record order).
        verify: ``"full"``, ``"header"`` or ``"none"`` (see `check_image`).
        workers: Check processes (1 checks in this process).
        manifest: Earlier results to reuse and update (see `inspect_files`); ``None`` checks all.

    Raises:
        BadImageError: ``on_bad_file="error"`` and a file is missing or unreadable.
        ValueError: ``on_bad_file`` or ``verify`` is not a known choice, or no readable image is
            left.
    """
    if on_bad_file not in ON_BAD_FILE_CHOICES:
        raise ValueError(f"on_bad_file must be one of {ON_BAD_FILE_CHOICES}, got {on_bad_file!r}")
    root = Path(root)
    outcomes, checked = inspect_files(root, [r.path for r in records], verify, workers, manifest)
    result = ScanResult(good=[], skipped=[], checked=checked)
    for record in records:
        outcome = outcomes[record.path]
        reason = outcome if isinstance(outcome, str) else outcome.reason
        if reason is not None:
            result.skipped.append((str(root / record.path), reason))
            continue
        result.good.append(record)
        if outcome.width is not None and outcome.height is not None:
            result.sizes[record.path] = (outcome.width, outcome.height)
    if result.skipped and on_bad_file == "error":
        path, reason = result.skipped[0]
        others = len(result.skipped) - 1
        more = f"and {others} more unreadable file{'s' if others > 1 else ''}; " if others else ""
        raise BadImageError(
            path, f"{reason} ({more}pass on_bad_file='skip' to leave such files out)"
        )
    _report(root, len(records), result)
    return result


def scan_records(
    root: str | os.PathLike[str],
    records: list[ImageRecord],
    on_bad_file: str = "skip",
    verify: str = "full",
    workers: int = 1,
    manifest: ScanManifest | None = None,
) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """Check every image once and drop (or refuse) the ones that cannot be read.

    With the defaults every file is decoded in this process and nothing is stored; see
    `scan_dataset` for the arguments.

    Returns:
        The readable records (in their original order) and the ``(path, reason)`` pairs skipped.

    Raises:
        BadImageError: ``on_bad_file="error"`` and a file is missing or unreadable.
        ValueError: ``on_bad_file`` is not one of ``"skip"``/``"error"``, or no readable image is
            left.
    """
    result = scan_dataset(root, records, on_bad_file, verify, workers, manifest)
    return result.good, result.skipped


def _report(root: Path, total: int, result: ScanResult) -> None:
    skipped = result.skipped
    if skipped:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
        log.warning(
            "skipped %d of %d images in %s that could not be read:\n%s",
            len(skipped), total, root, listing,
        )
    if not result.good:
        message = f"no readable images in {str(root)!r}: found {total} files, {len(skipped)} bad"
        if skipped:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[:_SHOW_REASONS])
            extra = len(skipped) - _SHOW_REASONS
            more = f"; and {extra} more" if extra > 0 else ""
            message += f" ({reasons}{more})"
        raise ValueError(message)


def _check_verify(verify: str) -> None:
    if verify not in VERIFY_CHOICES:
        choices = ", ".join(map(repr, VERIFY_CHOICES))
        raise ValueError(f"verify must be one of {choices}; got {verify!r}")


def _stat_file(path: str | os.PathLike[str]) -> os.stat_result | str:
    """The file's stat, or the reason it cannot be an image (same words as `load_rgb`)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot access file ({exc})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return info


def _unchanged(path: Path, entry: FileEntry) -> bool:
    info = _stat_file(path)
    if isinstance(info, str):
        return False
    return (info.st_size, info.st_mtime_ns) == (entry.size, entry.mtime_ns)


def _read_header(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open an image and read its size (swapped for EXIF rotations) without decoding pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if _header_orientation(img) in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
                width, height = height, width
            return width, height
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can identify") from None
    except _HEADER_ERRORS as exc:
        reason = f"cannot read image header ({type(exc).__name__}: {exc})"
        raise BadImageError(path, reason) from exc


def _header_orientation(img: Image.Image) -> int:
    # PIL's PNG reader decodes the whole image to find an eXIf chunk after the pixel data; only
    # use one that came before it (camera files are JPEG/TIFF/WebP, whose EXIF is in the header).
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: load_rgb's exif_transpose ignores it as well
        return 1


def _check_chunk(root: str, paths: list[str], verify: str) -> list[CheckResult]:
    """Check files in one process: ``(reason or None, width, height)`` per path."""
    results: list[CheckResult] = []
    for rel in paths:
        try:
            width, height = check_image(os.path.join(root, rel), verify)
        except BadImageError as exc:
            results.append((exc.reason, None, None))
        else:
            results.append((None, width, height))
    return results


def _check_files(root: Path, paths: list[str], verify: str, workers: int) -> list[CheckResult]:
    if verify == "none":  # the caller's stat already showed a non-empty regular file
        return [(None, None, None)] * len(paths)
    workers = min(workers, math.ceil(len(paths) / _MIN_FILES_PER_WORKER))
    if workers <= 1:
        return _check_chunk(str(root), paths, verify)
    chunk = max(1, min(_MAX_CHUNK, math.ceil(len(paths) / (workers * 4))))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    results: list[CheckResult] = []
    try:
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            for part in pool.map(partial(_check_chunk, str(root), verify=verify), chunks):
                results.extend(part)
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"an image-check worker process died while scanning {str(root)!r} (a decoder crash or "
            "out of memory); run the scan with one worker (scan_workers=1) to find the file"
        ) from exc
    return results


def _pool_context() -> multiprocessing.context.BaseContext:
    # Forked workers inherit the imported modules; spawned ones would each re-import torch and
    # Lightning (seconds apiece). They only read files with PIL, as DataLoader workers do.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()
