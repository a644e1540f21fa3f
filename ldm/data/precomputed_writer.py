"""Writing precomputed latents as litdata chunks, resumably: numbered parts, a completion marker for each.

Each split (and the caption table) is cut into parts of ``part_size`` items. Part ``p`` is written by a litdata
``BinaryWriter`` whose rank is ``p`` (chunks ``chunk-{p}-{i}.bin``, index ``{p}.index.json``, as the workers of
``litdata.optimize`` write theirs), then ``progress/{name}-{p}.done`` marks it complete. A rerun skips complete parts,
rewrites any other one from its start, and once every part of a folder is done litdata merges their indexes into
the folder's ``index.json``. ``progress/plan.json`` records what is being encoded, so a rerun with other inputs is
refused instead of mixing two encodes. This module knows no models: it gets ``encode`` functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from litdata.streaming.writer import BinaryWriter
from torch.utils.data import DataLoader, Dataset

from ldm.data.precomputed import INFO_FILE

__all__ = ["PrecomputedWriter", "caption_items", "image_items", "size_batches"]

log = logging.getLogger(__name__)

_PROGRESS = "progress"
_PLAN = "plan.json"


class _PartWriter(BinaryWriter):
    """A litdata ``BinaryWriter`` whose rank is a part number, so parts written one after another merge like workers."""

    def __init__(self, folder: str, part: int, chunk_bytes: int | str) -> None:
        super().__init__(folder, chunk_bytes=chunk_bytes)
        self._part = part

    @property
    def rank(self) -> int:
        return self._part


class PrecomputedWriter:
    """Resumable writer of one encode output folder.

    Args:
        out: Output folder (local).
        plan: JSON-able description of everything that determines the output (inputs, encoder fingerprints,
            dtype, part size...). A rerun with the same plan resumes; with another it is refused.
        part_size: Items per part (the unit of resumption).
        chunk_bytes: Target size of a litdata chunk, e.g. ``"64MB"``.
    """

    def __init__(self, out: str | os.PathLike[str], plan: dict[str, Any], part_size: int = 4096,
                 chunk_bytes: int | str = "64MB") -> None:
        if part_size < 1:
            raise ValueError(f"part_size must be a positive integer, got {part_size!r}")
        self.out, self.plan, self.part_size, self.chunk_bytes = Path(out), plan, part_size, chunk_bytes
        self.progress = self.out / _PROGRESS
        self.parts_written: dict[str, list[int]] = {}

    @property
    def complete(self) -> bool:
        """Whether the folder already holds this plan's finished output."""
        info = self.out / INFO_FILE
        return info.is_file() and json.loads(info.read_text()).get("plan") == self.plan

    def begin(self) -> None:
        """Create the folder and record the plan, or check that an unfinished one has the same plan.

        Raises:
            FileExistsError: the folder holds another encode (finished or not), naming the fix.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise RuntimeError("ldm data encode runs in a single process; start it without torchrun/srun tasks")
        info, plan_file = self.out / INFO_FILE, self.progress / _PLAN
        if info.is_file():
            raise FileExistsError(f"{self.out} already holds finished latents of other inputs or settings ({info}); "
                                  "choose another --out, or delete the folder to re-encode")
        if plan_file.is_file():
            old = json.loads(plan_file.read_text())
            if old != self.plan:
                changed = sorted(k for k in set(old) | set(self.plan) if old.get(k) != self.plan.get(k))
                raise FileExistsError(f"{self.out} holds an unfinished encode of other inputs or settings (differs in: "
                                      f"{', '.join(changed)}); rerun with the same ones to resume, choose another --out, "
                                      "or delete the folder to start over")
            log.info("resuming the encode in %s", self.out)
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"{self.out} exists and is not an encode output; choose an empty or new --out")
        self.progress.mkdir(parents=True, exist_ok=True)
        _write_json(plan_file, self.plan)

    def write(self, name: str, num_items: int, produce: Callable[[int, int], Iterable[dict[str, Any]]]) -> list[int]:
        """Write folder ``name`` with ``num_items`` items; ``produce(start, stop)`` yields items ``start..stop-1``.

        Returns:
            The parts written by this call (complete ones are skipped).
        """
        folder = self.out / name
        written: list[int] = []
        self.parts_written[name] = written
        if (folder / "index.json").is_file() or num_items == 0:
            return written
        folder.mkdir(parents=True, exist_ok=True)
        num_parts = math.ceil(num_items / self.part_size)
        for part in range(num_parts):
            marker = self.progress / f"{name}-{part:05d}.done"
            if marker.is_file() and (folder / f"{part}.index.json").is_file():
                continue
            for stale in folder.glob(f"chunk-{part}-*.bin"):
                stale.unlink()
            start, stop = part * self.part_size, min(num_items, (part + 1) * self.part_size)
            writer = _PartWriter(str(folder), part, self.chunk_bytes)
            count = 0
            for offset, item in enumerate(produce(start, stop)):
                writer.add_item(offset, item)
                count += 1
            if count != stop - start:
                raise RuntimeError(f"part {part} of {folder} produced {count} items, expected {stop - start}")
            writer.done()
            marker.touch()
            written.append(part)
            log.info("%s: part %d of %d done (items %d-%d)", folder, part + 1, num_parts, start, stop - 1)
        BinaryWriter(str(folder), chunk_bytes=self.chunk_bytes).merge(num_workers=num_parts)
        return written

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        """Write ``ldm_latents.json`` (``info`` plus the plan), which marks the output complete; drop the progress files."""
        info = {**info, "plan": self.plan}
        _write_json(self.out / INFO_FILE, info)
        shutil.rmtree(self.progress, ignore_errors=True)
        return info


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def size_batches(indices: Sequence[int], sizes: Sequence[tuple[int, int]] | None, batch_size: int,
                 window: int | None = None) -> list[list[int]]:
    """``indices`` cut into batches whose items share a size, in about index order.

    Without ``sizes``: consecutive runs of ``batch_size``. With per-item ``sizes`` (aspect-ratio buckets) a size's
    batch is cut when full, or as soon as its first item lies ``window`` (default ``4 * batch_size``) indices behind
    the current one, so that a reader restoring index order never holds much more than ``window`` items.
    """
    indices = list(indices)
    if sizes is None:
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    window = 4 * batch_size if window is None else window
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batches: list[list[int]] = []
    pending: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        waiting = pending.setdefault(tuple(sizes[i]), [])
        waiting.append(i)
        if len(waiting) == batch_size:
            batches.append(pending.pop(tuple(sizes[i])))
        for size in [size for size, items in pending.items() if i - items[0] >= window]:
            batches.append(pending.pop(size))
    return batches + sorted(pending.values())


def image_items(dataset: Dataset, records: Sequence[Any], start: int, stop: int,
                encode: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, batch_size: int,
                num_workers: int = 0, caption_ids: dict[str, int] | None = None,
                sizes: Sequence[tuple[int, int]] | None = None) -> Iterator[dict[str, Any]]:
    """Items ``start..stop-1`` of an image dataset (``{"image", "index"}`` items) with ``encode``'s moments, in order.

    Args:
        dataset: Yields the images exactly as training sees them (centre crop or bucket crop, no flip).
        records: The dataset's records (``path``, ``captions``), by index.
        start: First item.
        stop: One past the last item.
        encode: Images (B, 3, H, W) in [-1, 1] -> moments (B, 2C, h, w).
        dtype: Storage dtype of the moments.
        batch_size: Images per ``encode`` call.
        num_workers: DataLoader processes decoding images.
        caption_ids: Row of each caption in the caption table, when text embeddings are written.
        sizes: Per dataset item, its aspect-ratio bucket ``(height, width)``: images of one bucket are encoded
            together (:func:`size_batches`) and each item keeps its own latent shape. None: all one size.
    """
    loader = DataLoader(dataset, batch_sampler=size_batches(range(start, stop), sizes, batch_size), num_workers=num_workers)
    done: dict[int, torch.Tensor] = {}
    next_index = start
    for batch in loader:
        moments = encode(batch["image"]).to("cpu", dtype)
        for k, index in enumerate(batch["index"].tolist()):
            done[index] = moments[k].clone()
        while next_index in done:
            record = records[next_index]
            item: dict[str, Any] = {"index": next_index, "path": record.path, "captions": json.dumps(list(record.captions))}
            if caption_ids is not None:
                item["caption_ids"] = json.dumps([caption_ids[c] for c in record.captions])
            item["moments"] = done.pop(next_index)
            yield item
            next_index += 1


def caption_items(captions: Sequence[str], start: int, stop: int, encode: Callable[[list[str]], torch.Tensor],
                  dtype: torch.dtype, batch_size: int) -> Iterator[dict[str, Any]]:
    """Rows ``start..stop-1`` of the caption table: ``{"caption", "context"}`` with ``encode``'s embeddings."""
    for first in range(start, stop, batch_size):
        batch = list(captions[first : min(stop, first + batch_size)])
        context = encode(batch).to("cpu", dtype)
        for k, caption in enumerate(batch):
            yield {"caption": caption, "context": context[k].clone()}
