"""``ldm data optimize``: any dataset the folder DataModule reads, written as litdata chunks for streaming.

The output holds ``train/`` and ``val/`` litdata directories (the folder path's deterministic split), each item
``{"image": bytes as stored (or re-encoded with --resize), "captions": JSON list, "width", "height", "path",
"metadata": JSON}`` and, beside its chunks, ``ldm_sizes.json`` (every item's width and height in item order, so
aspect-ratio buckets are assigned without reading the images), and ``ldm_shards.json`` with the counts and the
skipped files. Unreadable files are left out
and counted exactly as the folder path does (they are found by its scan first).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb, pil_limit_off
from ldm.data.records import ImageRecord

log = logging.getLogger(__name__)

__all__ = ["SHARDS_INFO", "SIZES_FILE", "optimize_dataset"]

SHARDS_INFO = "ldm_shards.json"
SIZES_FILE = "ldm_sizes.json"


class _Encoder:
    """litdata's per-item function: picklable, so worker processes can run it."""

    def __init__(self, root: Path, resize: int | None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.root, self.resize, self.max_image_pixels = root, resize, max_image_pixels

    def __call__(self, record: ImageRecord) -> dict[str, Any]:
        path = self.root / record.path
        if self.resize is None:
            data = path.read_bytes()
            with pil_limit_off(), Image.open(io.BytesIO(data)) as img:  # the scan held it to max_image_pixels
                width, height = img.size
        else:
            image = load_rgb(path, self.max_image_pixels)
            scale = self.resize / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            image.save(buf, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=95)
            data, (width, height) = buf.getvalue(), image.size
        return {"image": data, "captions": json.dumps(record.captions), "width": width, "height": height,
                "path": record.path, "metadata": json.dumps(record.metadata, default=str)}


def _write_sizes(split_dir: Path) -> None:
    """Every item's ``[width, height]`` in the written order (litdata decides the order; read it back)."""
    from litdata import StreamingDataset

    shards = StreamingDataset(str(split_dir), shuffle=False)
    sizes = [[int(item["width"]), int(item["height"])] for item in (shards[i] for i in range(len(shards)))]
    (split_dir / SIZES_FILE).write_text(json.dumps(sizes))


def optimize_dataset(source: str, out: str | Path, workers: int = 1, resize: int | None = None, chunk_bytes: str = "64MB",
                     data_dir: str = "data", val_fraction: float = 0.1, progress: bool = False,
                     **datamodule_options: Any) -> dict[str, Any]:
    """Write the dataset at ``source`` (a folder or a built-in name) as litdata chunks under ``out``.

    Args:
        source: What ``ImageCaptionDataModule(root=...)`` accepts.
        out: Output directory (created; replaced if it holds an earlier output).
        workers: Worker processes of litdata's ``optimize``.
        resize: Re-encode images with their shorter side at most this many pixels (None: bytes as stored).
        chunk_bytes: Target chunk size.
        data_dir: Where a built-in dataset is prepared.
        val_fraction: As the DataModule's.
        progress: Show litdata's progress bar.
        datamodule_options: Other ``ImageCaptionDataModule`` arguments that shape the records (csv_file,
            image_column, caption_column, on_bad_file, verify, follow_symlinks, max_image_pixels, ...).

    Returns:
        The summary written to ``out/ldm_shards.json``.
    """
    from litdata import optimize

    from ldm.data.datamodule import ImageCaptionDataModule

    if "://" in str(out):
        raise ValueError(f"--out {out}: optimize writes to a local (or shared) directory; copy it to object storage "
                         "afterwards (e.g. aws s3 sync DIR s3://bucket/prefix) and point --data.root at the URL")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive number of pixels, got {resize}")
    dm = ImageCaptionDataModule(root=source, data_dir=data_dir, val_fraction=val_fraction, **datamodule_options)
    dm.prepare_data()
    dm.setup("fit")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"source": str(dm.dataset_root), "resize": resize,
                               "skipped": [list(s) for s in dm.skipped], "splits": {}}
    for split, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        records = list(dataset.records)
        summary["splits"][split] = len(records)
        if not records:
            continue
        # fork: workers start in milliseconds and need no __main__ guard (litdata's default, spawn, re-imports torch)
        optimize(fn=_Encoder(dm.dataset_root, resize, dm.max_image_pixels), inputs=records, output_dir=str(out / split), chunk_bytes=chunk_bytes,
                 num_workers=max(1, min(workers, len(records))), mode="overwrite", verbose=progress,
                 start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        _write_sizes(out / split)
    (out / SHARDS_INFO).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %d training and %d validation images to %s (%d unreadable skipped)",
             summary["splits"]["train"], summary["splits"]["val"], out, len(dm.skipped))
    return summary
