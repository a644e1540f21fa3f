"""How long the DataModule's image check takes at start-up: today's sequential decode against
parallel first starts and a second start that reuses the scan manifest.

    OMP_NUM_THREADS=1 python benchmarks/data_setup.py --n 100000
    OMP_NUM_THREADS=1 python benchmarks/data_setup.py --n 5000 --dir /tmp/noise5k   # keep the files

Writes ``--n`` random-noise JPEGs (``--size`` pixels square, 1,000 per folder, with a
metadata.jsonl) into ``--dir`` (reused when it already holds that many) or a temporary folder,
then times, in one run:

* today's path: every file decoded in one process, nothing stored (``scan_records`` defaults);
* a first start with the manifest, ``verify=full``, with 1, 2, ... worker processes;
* a first start with ``verify=header`` (reads sizes, decodes nothing);
* a second start: the manifest answers for every file (a stat per file, no decode).

The files were just written, so they are in the page cache: this measures decoding, not disk reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.manifest import ScanManifest
from ldm.data.scan import scan_dataset, scan_records
from ldm.data.sources import discover_records

PER_FOLDER = 1000


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _smooth(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour fields with a little grain: sizes and decode times closer to photographs than pure noise."""
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    field = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(field + rng.integers(-8, 9, (size, size, 3), dtype=np.int16), 0, 255).astype(np.uint8)


CONTENTS = {"noise": _noise, "smooth": _smooth}


def write_jpegs(root: Path, n: int, size: int, seed: int = 0, content: str = "noise") -> None:
    """``n`` JPEGs (``content``: ``noise`` or ``smooth``) under ``root/images/NNN/`` and a metadata.jsonl naming them."""
    rng = np.random.default_rng(seed)
    make = CONTENTS[content]
    lines = []
    for i in range(n):
        rel = f"images/{i // PER_FOLDER:03d}/{i:06d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make(rng, size)).save(path, quality=90)
        lines.append(json.dumps({"file_name": rel, "text": f"{content} {i}"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="number of images (default 100,000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--dir", help="dataset folder to write (kept; reused if it holds --n images); "
                        "default: a temporary folder, removed afterwards")
    parser.add_argument("--workers", type=int, nargs="+",
                        help="worker counts for the parallel first start (default: 1, 2, 4, 8 up to the CPU count)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cpus = os.cpu_count() or 1
    workers = args.workers or [w for w in (1, 2, 4, 8) if w <= max(2, cpus)]

    temporary = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="ldm-bench-data-")) if temporary else Path(args.dir)
    try:
        metadata = root / "metadata.jsonl"
        if metadata.is_file() and sum(1 for _ in open(metadata)) == args.n:
            print(f"reusing {args.n} images in {root}")
        else:
            root.mkdir(parents=True, exist_ok=True)
            seconds, _ = _timed(lambda: write_jpegs(root, args.n, args.size))
            print(f"wrote {args.n} {args.size}x{args.size} noise JPEGs to {root} in {seconds:.1f} s")
        manifest = ScanManifest(root)

        def forget() -> None:  # a first start: no manifest anywhere
            for path in manifest.locations:
                path.unlink(missing_ok=True)

        forget()
        load_before = os.getloadavg()
        discover_s, records = _timed(lambda: discover_records(root))

        rows: list[tuple[str, float]] = []
        seconds, (good, _) = _timed(lambda: scan_records(root, records))
        rows.append(("today: sequential full decode, no manifest", seconds))
        for w in workers:
            forget()
            seconds, _ = _timed(lambda: scan_dataset(root, records, verify="full", workers=w, manifest=manifest))
            rows.append((f"first start, verify=full, {w} worker{'s' if w > 1 else ''}", seconds))
        forget()
        seconds, _ = _timed(lambda: scan_dataset(root, records, verify="header", workers=workers[-1], manifest=manifest))
        rows.append((f"first start, verify=header, {workers[-1]} workers", seconds))
        forget()
        scan_dataset(root, records, verify="full", workers=workers[-1], manifest=manifest)
        seconds, second = _timed(lambda: scan_dataset(root, records, verify="full", workers=workers[-1], manifest=manifest))
        assert second.checked == 0 and len(second.good) == len(good)
        rows.append(("second start, manifest reused (verify=full)", seconds))
        load_after = os.getloadavg()
        manifest_mb = max(p.stat().st_size for p in manifest.locations if p.exists()) / 1e6

        baseline = rows[0][1]
        print(f"\n{args.n} images, {cpus} CPUs, load average {load_before[0]:.2f} before / "
              f"{load_after[0]:.2f} after; discover_records {discover_s:.2f} s (not included); "
              f"manifest {manifest_mb:.1f} MB\n")
        width = max(len(name) for name, _ in rows)
        print(f"{'set-up check':<{width}}  {'seconds':>8}  {'ms/image':>8}  {'speed-up':>8}")
        print(f"{'-' * width}  {'-' * 8}  {'-' * 8}  {'-' * 8}")
        for name, seconds in rows:
            print(f"{name:<{width}}  {seconds:8.2f}  {1000 * seconds / args.n:8.3f}  {baseline / seconds:7.1f}x")
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
