"""Training-loader throughput of the three data paths, on the same JPEGs, the same cores, in one run.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py                      # 2,000 256x256 JPEGs, 64 px crops
    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --n 300 --size 128   # a quick run
    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --vae checkpoints/digits-vae --dir /tmp/tp2k  # keep the data

Writes ``--n`` JPEGs (``--size`` pixels square, with a metadata.jsonl; ``--content noise`` is the worst case for a
JPEG decoder, ``smooth`` compresses like a photo) into ``--dir`` (reused when it holds the same set) or a temporary
folder, then, once each (one-time costs, printed):

* the folder DataModule's start-up image check (``verify=full``; later starts reuse its manifest);
* ``ldm data optimize`` (:func:`ldm.data.shards.optimize_dataset`) into litdata shards;
* ``ldm data encode`` (:func:`ldm.precompute.encode_dataset`) into precomputed VAE moments, with the VAE
  given as ``--vae`` or the tiny test VAE of tests/conftest.py (``TINY_VAE``, f=4), no text encoder;

and then times one training pass of each loader, with 0 and ``--workers`` DataLoader workers:

* raw: ``Image.open(p).convert("RGB")`` of the training-split JPEGs in a tight loop (with workers: the same decode
  in a DataLoader that returns nothing): the ceiling of any path that decodes these files on these cores;
* (a) folder: ``ImageCaptionDataModule.train_dataloader()``: decode + resize/crop + collate;
* (b) streaming: ``StreamingImageCaptionDataModule.train_dataloader()`` over the local optimize output;
* (c) precomputed: ``PrecomputedLatentsDataModule.train_dataloader()`` over the encode output (moments, no image).

Every path serves the same training split (``--val-fraction``) in batches of ``--batch-size``. The clock
(``time.perf_counter``) runs only around taking batches from the loader: the first batch (worker start-up, first
reads) is the warm-up and excluded (with ``W`` workers, the first ``3W`` batches: the workers start one after another and
make batches ahead, see ``warmup_batches``); samples/s is over the next ``--batches`` batches (default: the rest of the pass). A second
figure, "pass", is the whole pass including the warm-up and worker start-up: the pessimistic bound.
With ``--repeats`` > 1 the paths are run round-robin and the best of each is kept (a shared machine only ever
slows a run down). The files were just written, so they are in the page cache: this measures decoding and
transforms, not disk or network reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

try:
    from data_setup import write_jpegs
except ImportError:  # run as ``python -m benchmarks.data_throughput``
    from benchmarks.data_setup import write_jpegs

REPO = Path(__file__).resolve().parent.parent
PATHS = ("raw", "folder", "streaming", "precomputed")
LABELS = {
    "raw": "raw PIL decode (ceiling)",
    "folder": "(a) folder: ImageCaptionDataModule",
    "streaming": "(b) streaming shards (optimize)",
    "precomputed": "(c) precomputed latents (encode)",
}


# --- the data ------------------------------------------------------------------------------------------------------

def ensure_images(data: Path, n: int, size: int, content: str) -> str:
    """Write the JPEGs unless ``data`` already holds this very set; says which."""
    stamp = data / "bench.json"
    wanted = {"n": n, "size": size, "content": content}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (data / "metadata.jsonl").is_file():
        return f"reusing {n} {size}x{size} {content} JPEGs in {data}"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    started = time.perf_counter()
    write_jpegs(data, n, size, content=content)
    stamp.write_text(json.dumps(wanted))
    return f"wrote {n} {size}x{size} {content} JPEGs to {data} in {time.perf_counter() - started:.1f} s"


def tiny_vae(folder: Path) -> Path:
    """The tiny autoencoder of tests/conftest.py's ``make_ldm_assets`` (random weights, f=4), saved to ``folder``."""
    sys.path.insert(0, str(REPO))
    try:
        from tests.conftest import TINY_VAE
    finally:
        sys.path.remove(str(REPO))
    from ldm.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    vae.scaling_factor.fill_(0.5)
    vae.save_pretrained(folder)
    return folder


# --- the raw decode ceiling ----------------------------------------------------------------------------------------

def decode(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")  # convert() loads (decodes) every pixel
    image.load()
    return image


class DecodeOnly(Dataset):
    """Decodes file ``i`` and returns nothing worth sending back: the raw ceiling inside DataLoader workers."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> int:
        decode(self.paths[i])
        return 1


def count_collate(items: list[int]) -> int:
    return len(items)


def raw_batches(paths: list[Path], batch_size: int, workers: int) -> Iterable[int]:
    """Batches of ``batch_size`` decoded files: a plain loop with 0 workers, a DataLoader otherwise."""
    if workers > 0:
        return DataLoader(DecodeOnly(paths), batch_size=batch_size, num_workers=workers, collate_fn=count_collate)

    def loop() -> Iterable[int]:
        for start in range(0, len(paths), batch_size):
            for p in paths[start : start + batch_size]:
                decode(p)
            yield len(paths[start : start + batch_size])

    return loop()


# --- timing --------------------------------------------------------------------------------------------------------

def batch_len(batch: Any) -> int:
    if isinstance(batch, int):
        return batch
    return int(batch["index"].numel())


def sample_shape(batch: Any) -> str:
    if isinstance(batch, int):
        return "(decoded PIL)"
    key = "image" if "image" in batch else "moments"
    return f"{key} {'x'.join(map(str, batch[key].shape[1:]))}"


def time_pass(make: Callable[[], Iterable[Any]], limit: int | None, warmup: int = 1) -> dict[str, Any]:
    """Take batches from a fresh loader: the first ``warmup`` are the warm-up, the next ``limit`` (default: all) are
    timed. See :func:`warmup_batches` for why one batch is not enough with workers."""
    loader = make()
    started = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_samples = batch_len(first)
    for _ in range(warmup - 1):
        first_samples += batch_len(next(it))
    warm = time.perf_counter()
    samples = batches = 0
    for batch in it:
        samples += batch_len(batch)
        batches += 1
        if limit is not None and batches >= limit:
            break
    done = time.perf_counter()
    del it, loader  # stops the workers, outside the clock
    return {"warm_s": warm - started, "timed_s": done - warm, "samples": samples, "batches": batches,
            "first_samples": first_samples, "shape": sample_shape(first)}


def warmup_batches(workers: int, prefetch_factor: int = 2) -> int:
    """Batches taken before the clock starts: 1 in the main process. With ``W`` workers, ``(prefetch_factor + 1) * W``:
    workers start one after another (forks take longer than a small batch), and each works up to ``prefetch_factor``
    batches ahead, so when the first batch arrives others may be made already; starting the clock then would count
    them as free (a few batches in a short pass is many times the true rate). After this many the queue of made
    batches has drained and batches arrive as fast as the workers make them."""
    return 1 if workers == 0 else (prefetch_factor + 1) * workers


# --- main ----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2,000)")
    parser.add_argument("--size", type=int, default=256, help="side of the written JPEGs in pixels (default 256)")
    parser.add_argument("--content", choices=("noise", "smooth"), default="noise",
                        help="noise: random pixels, the decoder's worst case (default); smooth: photo-like")
    parser.add_argument("--image-size", type=int, default=64, help="training crop side (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every path (default 32)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="DataLoader workers to time besides 0 (default min(2, CPUs)); also used by optimize/encode")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches timed after the warm-up batch (default: the rest of one pass)")
    parser.add_argument("--repeats", type=int, default=1, help="passes per path and worker count, best kept (default 1)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share, as the DataModules' (default 0.1)")
    parser.add_argument("--resize", type=int, default=None,
                        help="optimize --resize: re-encode the shards' JPEGs with this shorter side (default: bytes as stored)")
    parser.add_argument("--vae", help="VAE to encode with (e.g. checkpoints/digits-vae); default: the tiny test VAE")
    parser.add_argument("--dir", help="folder for the JPEGs, shards and latents (kept; JPEGs reused when they match); "
                        "default: a temporary folder, removed afterwards")
    args = parser.parse_args()
    for name in ("n", "size", "image_size", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("litdata").setLevel(logging.ERROR)

    from ldm.data import ImageCaptionDataModule
    from ldm.data.precomputed_datamodule import PrecomputedLatentsDataModule
    from ldm.data.shards import optimize_dataset
    from ldm.data.streaming import StreamingImageCaptionDataModule
    from ldm.precompute import encode_dataset

    cpus = os.cpu_count() or 1
    worker_counts = sorted({0, args.workers})
    temporary = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="ldm-bench-throughput-")) if temporary else Path(args.dir)
    data, shards, latents = root / "jpeg", root / "shards", root / "latents"
    try:
        root.mkdir(parents=True, exist_ok=True)
        print(ensure_images(data, args.n, args.size, args.content))
        load_before = os.getloadavg()

        # One-time costs.
        one_time: list[tuple[str, float]] = []
        folder_options = {"root": str(data), "image_size": args.image_size, "batch_size": args.batch_size,
                          "val_fraction": args.val_fraction}
        (data / ".ldm-manifest.json").unlink(missing_ok=True)
        started = time.perf_counter()
        probe = ImageCaptionDataModule(**folder_options)
        probe.prepare_data()
        probe.setup("fit")
        one_time.append(("folder first start: image check (verify=full), manifest written", time.perf_counter() - started))
        records = list(probe.train_dataset.records)
        paths = [data / r.path for r in records]
        # The loaders drop the last partial batch; the raw loop decodes the same number of files.
        paths_raw = paths[: len(paths) // args.batch_size * args.batch_size] or paths

        if shards.exists():
            shutil.rmtree(shards)
        started = time.perf_counter()
        optimize_dataset(str(data), shards, workers=max(1, args.workers), resize=args.resize,
                         val_fraction=args.val_fraction)
        one_time.append((f"ldm data optimize ({max(1, args.workers)} workers, resize={args.resize})",
                         time.perf_counter() - started))
        shard_mb = sum(p.stat().st_size for p in (shards / "train").rglob("*") if p.is_file()) / 1e6

        vae = Path(args.vae) if args.vae else tiny_vae(root / "tiny-vae")
        if latents.exists():
            shutil.rmtree(latents)
        started = time.perf_counter()
        summary = encode_dataset(str(data), vae, latents, image_size=args.image_size, batch_size=args.batch_size,
                                 num_workers=args.workers, val_fraction=args.val_fraction)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        one_time.append((f"ldm data encode ({'tiny test VAE' if not args.vae else vae}, {device}, "
                         f"{args.workers} workers)", time.perf_counter() - started))
        latent_mb = sum(p.stat().st_size for p in (latents / "train").rglob("*") if p.is_file()) / 1e6
        jpeg_mb = sum(p.stat().st_size for p in paths) / 1e6

        # The loaders: one DataModule per path and worker count, set up outside the clock.
        makers: dict[tuple[str, int], Callable[[], Iterable[Any]]] = {}
        counts: dict[str, int] = {"raw": len(paths)}
        for w in worker_counts:
            folder = ImageCaptionDataModule(**folder_options, num_workers=w)
            folder.setup("fit")
            streaming = StreamingImageCaptionDataModule(str(shards), image_size=args.image_size,
                                                        batch_size=args.batch_size, num_workers=w)
            streaming.setup("fit")
            precomputed = PrecomputedLatentsDataModule(str(latents), batch_size=args.batch_size, num_workers=w,
                                                       text_embeddings=False)
            precomputed.setup("fit")
            counts.update(folder=len(folder.train_dataset), streaming=len(streaming.train_dataset),
                          precomputed=len(precomputed.train_dataset))
            makers["raw", w] = lambda w=w: raw_batches(paths_raw, args.batch_size, w)
            makers["folder", w] = folder.train_dataloader
            makers["streaming", w] = streaming.train_dataloader
            makers["precomputed", w] = precomputed.train_dataloader
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"the paths do not serve the same training split: {counts}")
        if len(paths) // args.batch_size < warmup_batches(max(worker_counts)) + 2:
            raise SystemExit(f"{len(paths)} training images make {len(paths) // args.batch_size} batches of "
                             f"{args.batch_size}: too few for {warmup_batches(max(worker_counts))} warm-up batches and "
                             "two timed ones; raise --n or lower --batch-size")

        best: dict[tuple[str, int], dict[str, Any]] = {}
        for _ in range(args.repeats):
            for w in worker_counts:
                for name in PATHS:
                    result = time_pass(makers[name, w], args.batches, warmup=warmup_batches(w))
                    key = (name, w)
                    if key not in best or result["samples"] / result["timed_s"] > best[key]["samples"] / best[key]["timed_s"]:
                        best[key] = result
        load_after = os.getloadavg()

        # The report.
        print(f"\n{cpus} CPUs; load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_before)} before the "
              f"timed part, {'/'.join(f'{x:.2f}' for x in load_after)} after; torch threads {torch.get_num_threads()}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"{len(paths)} training images ({args.n} written, {args.size}x{args.size} {args.content} JPEG, "
              f"{jpeg_mb:.1f} MB), crop {args.image_size}, batch {args.batch_size}; latents "
              f"{'x'.join(map(str, summary.info['moments_shape']))} moments; on disk: JPEG {jpeg_mb:.1f} MB, "
              f"shards {shard_mb:.1f} MB, latents {latent_mb:.1f} MB (train split)")
        print(f"timed: {'best of ' + str(args.repeats) + ' passes, ' if args.repeats > 1 else ''}"
              f"the batches after the warm-up (the first batch; with W workers the first 3W, see warmup_batches); "
              f"'pass s/s' = the whole pass incl. warm-up and worker start\n")

        print("one-time costs")
        width = max(len(name) for name, _ in one_time)
        for name, seconds in one_time:
            print(f"  {name:<{width}}  {seconds:8.2f} s  {1000 * seconds / args.n:7.2f} ms/image")
        print()

        header = (f"{'path':<34} {'workers':>7} {'batches':>7} {'samples/s':>10} {'ms/batch':>9} {'warm-up s':>9} "
                  f"{'pass s/s':>9} {'x raw':>7} {'x (a)':>7}  sample")
        print(header)
        print("-" * len(header))
        for w in worker_counts:
            rate = {name: best[name, w]["samples"] / best[name, w]["timed_s"] for name in PATHS}
            for name in PATHS:
                r = best[name, w]
                whole = (r["samples"] + r["first_samples"]) / (r["timed_s"] + r["warm_s"])
                print(f"{LABELS[name]:<34} {w:>7} {r['batches']:>7} {rate[name]:>10.1f} "
                      f"{1000 * r['timed_s'] / r['batches']:>9.1f} {r['warm_s']:>9.2f} {whole:>9.1f} "
                      f"{rate[name] / rate['raw']:>6.2f}x {rate[name] / rate['folder']:>6.2f}x  {r['shape']}")
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
