"""Training throughput of LatentDiffusion with the latent cache (``cache_dir``) vs encoding every batch.

The same demo-sized run (configs/diffusion/digits.yaml's UNet, a digits-sized VAE with f=4 and random weights, a
2-layer 64-wide text encoder, 32x32 images, batch 128) trains for ``--steps`` steps through Lightning's Trainer
(``max_steps``, no logger, no checkpoints, no validation) on a generated dataset of captioned PNGs in a temporary
folder, once with ``cache_dir`` and once without, alternating for ``--repeats`` rounds in one process. Samples/s are
counted from step ``--warmup`` to the end; the cache's one-off build (encoding every image once, at set-up) is
reported apart. Two cases:

  trained-text  the demo's set-up: the text encoder trains jointly, so only VAE latents are cached
  frozen-text   a frozen text encoder: latents and text embeddings are cached

Data loading runs in the main process (``num_workers`` 0, ``--workers`` changes it) in both runs.

    .venv/bin/python benchmarks/cache_throughput.py           # the figures
    .venv/bin/python benchmarks/cache_throughput.py --quick   # a check that the script runs (figures mean nothing)
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is run
from bench_common import machine_line, parser_from_doc  # noqa: E402
from unet_pair import DEMO_UNET  # noqa: E402

CASES = {"trained-text": True, "frozen-text": False}  # name: train_text_encoder


def write_dataset(root: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """``n`` random blocky RGB PNGs with captions, in the metadata.jsonl layout."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
            Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(root / "images" / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"images/{i:05d}.png", "text": f"a handwritten digit {i % 10}"}) + "\n")
    return root


def write_assets(root: Path, n_images: int) -> dict[str, str]:
    """The dataset, a saved random VAE (digits-sized, f=4) and a tokenizer."""
    from ldm.data.tokenizer import train_clip_tokenizer
    from ldm.models import AutoencoderKL

    data = write_dataset(root / "data", n_images)
    torch.manual_seed(0)
    vae = AutoencoderKL(vae=dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=32, z_channels=4))
    vae.save_pretrained(root / "vae")
    tokenizer = train_clip_tokenizer([f"a handwritten digit {d}" for d in range(10)] * 3, root / "tokenizer", vocab_size=600)
    return {"data": str(data), "vae": str(root / "vae"), "tokenizer": str(tokenizer)}


class Clock:
    """A Lightning callback noting when training starts and when step ``warmup`` begins and the last one ends."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.fit_start = self.train_start = self.timed_start = self.end = 0.0

    def as_callback(self):
        import lightning.pytorch as pl

        clock = self

        class _Clock(pl.Callback):
            def setup(self, trainer, pl_module, stage):  # before the model's setup (which builds the cache)
                clock.fit_start = time.perf_counter()

            def on_train_start(self, trainer, pl_module):
                clock.train_start = time.perf_counter()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == clock.warmup:
                    clock.timed_start = time.perf_counter()

            def on_train_end(self, trainer, pl_module):
                clock.end = time.perf_counter()

        return _Clock()


def run(assets: dict[str, str], train_text: bool, cache_dir: str | None, steps: int, warmup: int, batch: int,
        workers: int) -> tuple[float, float]:
    """One fit: (samples/s from step ``warmup`` on, seconds of set-up before the first step)."""
    import lightning.pytorch as pl

    from ldm.data import ImageCaptionDataModule
    from ldm.models import LatentDiffusion

    pl.seed_everything(0, verbose=False)
    unet = {k: v for k, v in DEMO_UNET.to_dict().items() if k not in ("in_channels", "out_channels", "context_dim")}
    model = LatentDiffusion(autoencoder=assets["vae"], tokenizer=assets["tokenizer"], unet=unet,
                            text_encoder_config={"hidden_size": 64, "num_layers": 2, "num_heads": 2},
                            train_text_encoder=train_text, cache_dir=cache_dir, optimizer={"learning_rate": 1e-3},
                            validation={"prompts": []})
    dm = ImageCaptionDataModule(root=assets["data"], image_size=32, batch_size=batch, val_fraction=0.0, num_workers=workers)
    clock = Clock(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock.as_callback()])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == steps, trainer.global_step
    return (steps - warmup) * batch / (clock.end - clock.timed_start), clock.train_start - clock.fit_start


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="(default: both)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the count (default 5)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128, the demo's)")
    parser.add_argument("--images", type=int, default=2048, help="images in the generated dataset (default 2048)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (cached, uncached) runs per case (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: the main process)")
    parser.add_argument("--quick", action="store_true", help="4 steps of batch 8, 1 round: a check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.images, args.repeats = 4, 1, 8, 32, 1
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no Trainer banners between the rows
    warnings.filterwarnings("ignore")
    print(machine_line())
    print(f"{args.steps} steps of batch {args.batch} per run (first {args.warmup} not counted), {args.images} 32x32 "
          f"images, {args.workers} loader workers, median of {args.repeats} alternating runs")
    print(f"{'case':13s} {'cached samples/s':>17s} {'uncached samples/s':>19s} {'ratio':>7s} {'cache build s':>14s}")
    with tempfile.TemporaryDirectory() as tmp:
        assets = write_assets(Path(tmp), args.images)
        for case in args.cases:
            cache_dir = str(Path(tmp) / f"cache-{case}")
            rates: dict[str, list[float]] = {"cached": [], "uncached": []}
            build = None
            for _ in range(args.repeats):
                rate, setup_s = run(assets, CASES[case], cache_dir, args.steps, args.warmup, args.batch, args.workers)
                build = setup_s if build is None else build  # the first cached run builds the cache
                rates["cached"].append(rate)
                rates["uncached"].append(run(assets, CASES[case], None, args.steps, args.warmup, args.batch, args.workers)[0])
            r = {k: statistics.median(v) for k, v in rates.items()}
            print(f"{case:13s} {r['cached']:17.1f} {r['uncached']:19.1f} {r['cached'] / r['uncached']:6.2f}x {build:14.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
