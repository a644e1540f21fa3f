"""Reading precomputed latents written by ``ldm data encode``: the layout, its ``ldm_latents.json``, and a dataset.

Layout of an encode output ``DIR`` (a local folder or a URL litdata reads, ``s3://bucket/latents``):

* ``DIR/ldm_latents.json``: what was encoded and with what (see :data:`INFO_FILE`); written last, so its presence
  means the encode is complete.
* ``DIR/train/``, ``DIR/val/``: litdata chunk directories, one item per image in the source DataModule's split
  order: ``index`` (int), ``path`` (str), ``captions`` (JSON list of str), ``moments`` (tensor ``[2C, h, w]``: the
  VAE posterior's mean and log-variance, unscaled) and, with text embeddings, ``caption_ids`` (JSON list of int:
  rows of ``text/``). With aspect-ratio buckets (``ldm_latents.json``'s ``buckets``: ``{"sizes": [[h, w], ...],
  "train": [bucket of each item], "val": [...]}``) each item's moments have its bucket's latent shape.
* ``DIR/text/`` (only with a text encoder): one item per distinct caption, ``caption`` (str) and ``context``
  (tensor ``[L, D]``); row :data:`EMPTY_PROMPT_ID` is the empty prompt (for caption dropout).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch.utils.data import Dataset

from ldm.data.dataset import caption_index

__all__ = ["EMPTY_PROMPT_ID", "FORMAT", "INFO_FILE", "SPLITS", "TEXT_DIR", "PrecomputedLatentsDataset",
           "check_local_chunks", "join_url", "read_info"]

INFO_FILE = "ldm_latents.json"
FORMAT = "ldm-precomputed-latents/1"
SPLITS = ("train", "val")
TEXT_DIR = "text"
EMPTY_PROMPT_ID = 0


def join_url(root: str | os.PathLike[str], part: str) -> str:
    """``root/part`` for a local folder or a URL."""
    return str(root).rstrip("/") + "/" + part


def _is_remote(root: str) -> bool:
    return "://" in root or root.startswith("local:")


def read_info(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``ldm_latents.json`` of an encode output (local folder or remote URL).

    Raises:
        FileNotFoundError: ``root`` holds no complete encode (naming the fix).
        ValueError: the file is not an encode output this version reads.
    """
    root = str(root)
    hint = (f"{root} holds no complete precomputed latents ({INFO_FILE} is missing); write them with "
            "'ldm data encode SRC --vae MODEL --out DIR' (an interrupted encode resumes when rerun)")
    if _is_remote(root):
        from litdata.streaming.downloader import get_downloader

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, INFO_FILE)
            try:
                get_downloader(root, tmp, []).download_file(join_url(root, INFO_FILE), local)
                with open(local) as f:
                    info = json.load(f)
            except FileNotFoundError as error:
                raise FileNotFoundError(hint) from error
    else:
        path = os.path.join(root, INFO_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(hint)
        with open(path) as f:
            info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{join_url(root, INFO_FILE)}: format {info.get('format')!r}, expected {FORMAT!r}; "
                         "re-encode with this version's 'ldm data encode'")
    return info


def check_local_chunks(folder: str | os.PathLike[str]) -> None:
    """Check that every chunk file of a local litdata folder has the size its ``index.json`` recorded.

    A truncated or missing chunk would otherwise fail deep inside a DataLoader worker, mid-training.

    Raises:
        ValueError: A chunk is missing or has another size (naming it and the fix).
    """
    index_path = os.path.join(folder, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return  # litdata's own error about the index is clear enough
    if (index.get("config") or {}).get("compression"):
        return  # compressed chunks are not stored at their recorded size
    for chunk in index.get("chunks", []):
        path = os.path.join(folder, chunk["filename"])
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None
        if size != chunk["chunk_bytes"]:
            found = "is missing" if size is None else f"is {size} bytes, {chunk['chunk_bytes']} when written"
            raise ValueError(f"{path} {found}: the precomputed latents are damaged (a copy cut short, or a full disk); "
                             "re-run 'ldm data encode' into a new --out, or copy the folder again")


class PrecomputedLatentsDataset(Dataset):
    """One split of an ``ldm data encode`` output, as ``{"moments": FloatTensor[2C, h, w], "text": str, "index": int}``
    items, plus ``"context": FloatTensor[L, D]`` (the chosen caption's embedding) when text embeddings were written.
    ``sizes``: each item's aspect-ratio bucket ``(height, width)`` when encoded with buckets, else None.

    Like :class:`~ldm.data.dataset.ImageCaptionDataset`, training mode draws one of the image's captions uniformly
    with ``torch.randint`` at each access; eval mode takes the first; an image without captions gives ``""``.
    Reads go through ``litdata.StreamingDataset`` (random access), so ``root`` may be a remote URL.

    Args:
        root: The encode output: a local folder or a URL litdata reads.
        split: ``"train"`` or ``"val"``.
        train: Training mode (random caption per access) or eval mode (first caption).
        text_embeddings: Return ``"context"`` when the output has text embeddings (False: captions only).
        cache_dir: Local cache for remote chunks (litdata's default when None).
        max_cache_size: Bound of that cache, e.g. ``"50GB"``.
        info: The output's ``ldm_latents.json`` when already read (read from ``root`` otherwise).
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train", train: bool = True, text_embeddings: bool = True,
                 cache_dir: str | None = None, max_cache_size: str = "50GB", info: dict[str, Any] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split, self.train = str(root), split, train
        self.info = info if info is not None else read_info(self.root)
        self._count = int(self.info["counts"][split])
        self.has_context = bool(text_embeddings and self.info.get("text_encoder_fingerprint"))
        self._options = {"cache_dir": cache_dir, "max_cache_size": max_cache_size}
        self.sizes = self._bucket_sizes()
        self._items = self._open(split) if self._count else None
        self._texts = self._open(TEXT_DIR) if self.has_context else None

    def _open(self, part: str):
        from litdata import StreamingDataset

        url = join_url(self.root, part)
        try:
            ds = StreamingDataset(url, shuffle=False, **self._options)
        except (FileNotFoundError, ValueError) as error:
            raise FileNotFoundError(f"{url}: cannot read the litdata chunks ({error}); the encode output is damaged, "
                                    "re-run 'ldm data encode' into a new --out") from error
        if not _is_remote(url):
            check_local_chunks(url)
        expected = self._count if part != TEXT_DIR else int(self.info["counts"]["captions"])
        stored = sum(end - start for start, end in ds.region_of_interest)
        if stored != expected:
            raise ValueError(f"{url} holds {stored} items but {INFO_FILE} says {expected}; re-run 'ldm data encode' "
                             "into a new --out")
        return ds

    def _bucket_sizes(self) -> list[tuple[int, int]] | None:
        """Each item's bucket ``(height, width)`` in pixels, from ``ldm_latents.json``; None: all squares."""
        buckets = self.info.get("buckets")
        if not buckets:
            return None
        table = [tuple(size) for size in buckets["sizes"]]
        sizes = [table[b] for b in buckets[self.split]]
        if len(sizes) != self._count:
            raise ValueError(f"{join_url(self.root, INFO_FILE)} lists {len(sizes)} buckets for {self._count} {self.split} "
                             "items; re-run 'ldm data encode' into a new --out")
        return sizes

    @property
    def chunk_sizes(self) -> list[int]:
        """Items per storage chunk, in order (for chunk-local shuffling)."""
        if self._items is None:
            return []
        return [end - start for start, end in self._items.region_of_interest]

    def __len__(self) -> int:
        return self._count

    def captions(self, index: int) -> list[str]:
        """Every caption of image ``index``."""
        return json.loads(self._item(index)["captions"])

    def _item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._count:
            raise IndexError(f"index {index} is outside the {self._count} {self.split} items of {self.root}")
        return self._items[int(index)]


    def context(self, caption_id: int) -> torch.Tensor:
        """The stored text embedding of row ``caption_id`` of ``text/`` (float32)."""
        if self._texts is None:
            raise RuntimeError(f"{self.root} has no text embeddings (encode with --text-encoder) or they were turned off")
        return self._texts[int(caption_id)]["context"].to(torch.float32, copy=True)  # not a view of the chunk

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._item(index)
        captions = json.loads(item["captions"])
        out: dict[str, Any] = {"moments": item["moments"].to(torch.float32, copy=True), "text": "", "index": int(index)}
        caption_id = EMPTY_PROMPT_ID
        if captions:
            j = caption_index(len(captions), self.train)
            out["text"] = captions[j]
            if self.has_context:
                caption_id = json.loads(item["caption_ids"])[j]
        if self.has_context:
            out["context"] = self.context(caption_id)
        return out
