"""Symbolic links in a dataset folder: where a path really leads, and whether it may be read.

The lexical rule for ``file_name`` values (`ldm.data.records.safe_relative_path`) stops ``../``; a
symbolic link can still lead out of the folder (``images/cat.png -> /etc/passwd``, or a linked
folder ``images -> /home/me``). `LinkGuard` resolves real paths and applies the same rule to them:
by default a link may only lead to a place inside the (real) dataset folder, and one that leads out
is refused with an `OutsideDatasetError`, as a ``../`` path is, whatever ``on_bad_file`` says.
With ``follow_symlinks=True`` (for datasets assembled from links) a link may lead anywhere. In
both cases a link's target must exist (a dangling link is a bad file, skipped or refused by
``on_bad_file``), and the image check that follows makes sure that it is an image.
"""

from __future__ import annotations

import os
import stat

from ldm.data.records import OutsideDatasetError

__all__ = ["LinkGuard"]

_SHOW = 5


class LinkGuard:
    """Decides whether files under a dataset root may be read, judging where links really lead.

    Links that lead out of the folder (without ``follow_symlinks``) are collected as they are met
    and refused together by `raise_escapes`, so that one error lists them all.

    Args:
        root: The dataset folder (itself may be a link: its real path is the boundary).
        follow_symlinks: Allow links that lead out of ``root`` (their target must still exist).
    """

    def __init__(self, root: str | os.PathLike[str], follow_symlinks: bool = False) -> None:
        self.root = os.fspath(root)
        self.real_root = os.path.realpath(self.root)
        self.follow_symlinks = follow_symlinks
        self.escapes: list[tuple[str, str]] = []  # (the link as found, where it really leads)
        self._dirs: dict[str, str | None] = {}

    def inside(self, real_path: str) -> bool:
        """Whether an absolute real path lies in the real dataset folder."""
        return real_path == self.real_root or real_path.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def allows(self, path: str, real_path: str) -> bool:
        """Whether ``path`` (as found), which really is ``real_path``, may be read; an escape is recorded."""
        if self.follow_symlinks or self.inside(real_path):
            return True
        self.escapes.append((path, real_path))
        return False

    def check(self, rel: str) -> tuple[str | None, os.stat_result | None]:
        """Judge the file ``root/rel``.

        Returns:
            ``(reason, lstat)``: ``reason`` is why the file may not be read (a dangling link, or
            one out of the folder, which is also recorded for `raise_escapes`), else ``None``;
            ``lstat`` is the file's own ``os.lstat`` when it is not a link (reusable as its
            stat), else ``None``.
        """
        folder = os.path.dirname(rel)
        if folder not in self._dirs:
            real_folder = os.path.realpath(os.path.join(self.root, folder))
            allowed = self.allows(os.path.join(self.root, folder), real_folder)
            self._dirs[folder] = None if allowed else f"its folder leads out of the dataset folder, to {real_folder!r}"
        if self._dirs[folder] is not None:
            return self._dirs[folder], None
        path = os.path.join(self.root, rel)
        try:
            info = os.lstat(path)
        except OSError:
            return None, None  # missing or inaccessible: the stat that follows reports it
        if not stat.S_ISLNK(info.st_mode):
            return None, info
        real = os.path.realpath(path)
        if not os.path.exists(real):
            return f"symbolic link to {os.readlink(path)!r}, which does not exist", None
        if not self.allows(path, real):
            return f"symbolic link out of the dataset folder, to {real!r}", None
        return None, None

    def raise_escapes(self) -> None:
        """Refuse the links out of the folder met so far, listing them.

        Raises:
            OutsideDatasetError: At least one was met.
        """
        if not self.escapes:
            return
        listing = "; ".join(f"{path} -> {real}" for path, real in self.escapes[:_SHOW])
        more = f"; and {len(self.escapes) - _SHOW} more" if len(self.escapes) > _SHOW else ""
        raise OutsideDatasetError(
            self.root,
            f"{len(self.escapes)} symbolic link{'s lead' if len(self.escapes) > 1 else ' leads'} out of the "
            f"dataset folder {self.real_root!r} ({listing}{more}). Training reads no file outside its "
            "dataset folder, as with '../' paths: remove the links or copy the files in, or pass "
            "follow_symlinks=True (--data.follow_symlinks true) to read linked files",
        )
