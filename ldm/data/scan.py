"""Check every image of a dataset at set-up, so broken files surface before training starts.

How hard each file is checked is the ``verify`` mode: ``"full"`` decodes every pixel (what
training will do), ``"header"`` opens the file and reads its size without decoding pixels (catches
non-images and most damage, not a truncated pixel stream), ``"none"`` only checks that the file
exists, is a regular file and is not empty. Checks run in ``workers`` processes, and with a
`ScanManifest` their results are kept so that the next start only checks new or changed files.

Two rules apply before any of that, on every start: a symbolic link may not lead out of the dataset
folder (`ldm.data.links.LinkGuard`: an error, as for ``../``; ``follow_symlinks=True`` allows it), and an image may not have
more than ``max_image_pixels`` pixels (read from the header, never decoded; judged from the stored
width and height, so a changed limit applies to files the manifest already knows).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import stat
import time
from collections.abc import Sequence
from contextlib import nullcontext
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ldm.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    check_pixel_limit,
    load_rgb,
    pil_limit_off,
    read_size,
    too_large_reason,
)
from ldm.data.links import LinkGuard
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

Outcome = FileEntry | str  # a check's entry, or the reason a file could not even be checked
# (reason or None, width, height, the verify mode the check reached): an image above the pixel
# limit is only checked as far as its header, and stored as such.
CheckResult = tuple[str | None, int | None, int | None, str]


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
    path: str | os.PathLike[str],
    verify: str = "full",
    max_image_pixels: int | None = None,
) -> tuple[int | None, int | None]:
    """Check one image file as hard as ``verify`` says.

    Args:
        path: Image file.
        verify: ``"full"`` (decode every pixel, as training will), ``"header"`` (open and read the
            size only) or ``"none"`` (the file exists, is regular and not empty).
        max_image_pixels: Refuse an image with more pixels than this, from its header (before
            decoding), in place of PIL's decompression-bomb check; ``None`` leaves that check to
            PIL. Not checked with ``verify="none"``.

    Returns:
        ``(width, height)`` after EXIF orientation, or ``(None, None)`` for ``verify="none"``.

    Raises:
        ImageTooLargeError: The header declares more than ``max_image_pixels`` pixels.
        BadImageError: The file fails the check.
        ValueError: ``verify`` is not one of `VERIFY_CHOICES`.
    """
    _check_verify(verify)
    with pil_limit_off() if max_image_pixels is not None else nullcontext():
        if verify == "full":
            if max_image_pixels is not None:
                size = _header_or_none(path)
                if size is not None:
                    check_pixel_limit(path, size, max_image_pixels)
            with load_rgb(path) as img:
                return img.size
        info = _stat_file(path)
        if isinstance(info, str):
            raise BadImageError(path, info)
        if verify == "none":
            return None, None
        size = read_size(path)
        check_pixel_limit(path, size, max_image_pixels)
        return size


def inspect_files(
    root: str | os.PathLike[str],
    paths: Sequence[str],
    verify: str = "full",
    workers: int = 1,
    manifest: ScanManifest | None = None,
    follow_symlinks: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[dict[str, Outcome], int]:
    """Check files, reusing and then updating a manifest, without judging the outcome.

    Every file is stat'ed (and its links judged by `LinkGuard`); one whose size and mtime match a
    manifest entry of at least the asked ``verify`` strength is not opened again. The others are
    checked (in ``workers`` processes), and the manifest is rewritten when anything differs from
    what it held: new or changed files, files that disappeared, or a manifest that was missing or
    unreadable. An image above ``max_image_pixels`` is read only as far as its header and stored
    as a readable ``"header"`` entry with its size: `scan_dataset` judges the size against the
    limit in force.

    Args:
        root: Dataset folder that ``paths`` are relative to.
        paths: Relative image paths (forward slashes); duplicates are checked once.
        verify: ``"full"``, ``"header"`` or ``"none"`` (see `check_image`).
        workers: Check processes (1 checks in this process).
        manifest: Where earlier results are read and these are written; ``None`` checks every
            file and stores nothing.
        follow_symlinks: Allow symbolic links that lead out of ``root`` (see `LinkGuard`).
        max_image_pixels: Decode no image with more pixels than this.

    Returns:
        For each path, its `FileEntry` (``entry.reason`` is ``None`` when readable) or, for a file
        that is missing, not a regular file, empty or a dangling link, that reason; and how many
        files were checked.

    Raises:
        OutsideDatasetError: A path leads out of ``root`` through a symbolic link (without
            ``follow_symlinks``), whatever ``on_bad_file`` says; nothing has been opened.
    """
    _check_verify(verify)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    root = Path(root)
    guard = LinkGuard(root, follow_symlinks)
    stored = manifest.load() if manifest is not None else {}
    outcomes: dict[str, Outcome] = {}
    pending: list[tuple[str, int, int]] = []
    known = 0
    for rel in dict.fromkeys(paths):
        info = _stat_file(root / rel, guard, rel)
        if isinstance(info, str):
            outcomes[rel] = info
            continue
        entry = stored.get(rel)
        if entry is not None and entry.satisfies(info.st_size, info.st_mtime_ns, verify):
            outcomes[rel] = entry
            known += 1
        else:
            pending.append((rel, info.st_size, info.st_mtime_ns))
    guard.raise_escapes()  # before any file is opened
    if pending:
        started = time.perf_counter()
        log.info(
            "checking %d of %d images in %s (verify=%s, %d worker%s; %d known from the manifest)",
            len(pending), len(outcomes) + len(pending), root, verify, workers,
            "s" if workers > 1 else "", known,
        )
        results = _check_files(root, [rel for rel, _, _ in pending], verify, workers, max_image_pixels)
        for (rel, size, mtime_ns), (reason, width, height, reached) in zip(pending, results):
            outcomes[rel] = FileEntry(size, mtime_ns, reached, reason, width, height)
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
    follow_symlinks: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ScanResult:
    """Check every record's image and drop (or refuse) the ones that cannot be used.

    Args:
        root: Dataset folder that record paths are relative to.
        records: Records to check.
        on_bad_file: ``"skip"`` drops unreadable, missing or too large files and dangling links,
            and logs a warning listing each one with its reason; ``"error"`` raises for the first
            one (in record order). A link out of ``root`` is always an error.
        verify: ``"full"``, ``"header"`` or ``"none"`` (see `check_image`).
        workers: Check processes (1 checks in this process).
        manifest: Earlier results to reuse and update (see `inspect_files`); ``None`` checks all.
        follow_symlinks: Allow symbolic links that lead out of ``root`` (else they raise
            `OutsideDatasetError`); their targets must still exist and be images.
        max_image_pixels: Leave out images with more pixels than this, judged from the header
            (not with ``verify="none"``, which reads no header).

    Raises:
        BadImageError: ``on_bad_file="error"`` and a file is missing, unreadable or too large.
        OutsideDatasetError: A symbolic link leads out of ``root`` (without ``follow_symlinks``).
        ValueError: ``on_bad_file`` or ``verify`` is not a known choice, or no readable image is
            left.
    """
    if on_bad_file not in ON_BAD_FILE_CHOICES:
        raise ValueError(f"on_bad_file must be one of {ON_BAD_FILE_CHOICES}, got {on_bad_file!r}")
    root = Path(root)
    outcomes, checked = inspect_files(root, [r.path for r in records], verify, workers, manifest,
                                      follow_symlinks, max_image_pixels)
    result = ScanResult(good=[], skipped=[], checked=checked)
    for record in records:
        outcome = outcomes[record.path]
        reason = outcome if isinstance(outcome, str) else _judge(outcome, max_image_pixels)
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
    follow_symlinks: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
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
    result = scan_dataset(root, records, on_bad_file, verify, workers, manifest, follow_symlinks,
                          max_image_pixels)
    return result.good, result.skipped


def _judge(entry: FileEntry, max_image_pixels: int) -> str | None:
    """Why a checked file cannot be used (its check's reason, or a size above the limit), or None."""
    if entry.reason is not None:
        return entry.reason
    if entry.width is not None and entry.height is not None:
        if entry.width * entry.height > max_image_pixels:
            return too_large_reason(entry.width, entry.height, max_image_pixels)
    return None


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


def _stat_file(
    path: str | os.PathLike[str], guard: LinkGuard | None = None, rel: str = ""
) -> os.stat_result | str:
    """The file's stat, or the reason it cannot be an image (same words as `load_rgb`); with a
    ``guard``, a link that may not be followed (``rel``: the path relative to its root) is refused."""
    info = None
    if guard is not None:
        reason, info = guard.check(rel)
        if reason is not None:
            return reason
    try:
        info = info or os.stat(path)
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


def _header_or_none(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """`read_size`, or None when the header cannot be read (decoding then names the problem)."""
    try:
        return read_size(path)
    except BadImageError:
        return None


def _check_chunk(
    root: str, paths: list[str], verify: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[CheckResult]:
    """Check files in one process: ``(reason or None, width, height, verify reached)`` per path.

    Sizes are not judged here (`scan_dataset` does, against the limit in force), but an image above
    ``max_image_pixels`` is never decoded: its check stops at the header. PIL's own limit is off.
    """
    results: list[CheckResult] = []
    with pil_limit_off():
        for rel in paths:
            path = os.path.join(root, rel)
            size = _header_or_none(path) if verify == "full" else None
            if size is not None and size[0] * size[1] > max_image_pixels:
                results.append((None, size[0], size[1], "header"))
                continue
            try:
                width, height = check_image(path, verify)
            except BadImageError as exc:
                results.append((exc.reason, None, None, verify))
            else:
                results.append((None, width, height, verify))
    return results


def _check_files(
    root: Path, paths: list[str], verify: str, workers: int, max_image_pixels: int
) -> list[CheckResult]:
    if verify == "none":  # the caller's stat already showed a non-empty regular file
        return [(None, None, None, verify)] * len(paths)
    workers = min(workers, math.ceil(len(paths) / _MIN_FILES_PER_WORKER))
    if workers <= 1:
        return _check_chunk(str(root), paths, verify, max_image_pixels)
    chunk = max(1, min(_MAX_CHUNK, math.ceil(len(paths) / (workers * 4))))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    results: list[CheckResult] = []
    try:
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            check = partial(_check_chunk, str(root), verify=verify, max_image_pixels=max_image_pixels)
            for part in pool.map(check, chunks):
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
