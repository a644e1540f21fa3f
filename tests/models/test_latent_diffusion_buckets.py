"""LatentDiffusion with aspect-ratio buckets and the latent cache: cached moments per bucket, single-shaped batches,
validation samples at the bucket sizes, and an export whose sample size stays the square base size."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from conftest import tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule
from ldm.models import LatentDiffusion
from ldm.pipeline import LatentDiffusionPipeline

# (width, height): wide, tall and square; image_size 32 with multiple 8 gives buckets 40x24, 32x32 and 24x40 (h x w).
SHAPES = [(64, 32), (32, 64), (48, 48)]


class RecordShapes(pl.Callback):
    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert "image" not in batch  # trained from the cache
        self.shapes.append(tuple(batch["moments"].shape[-2:]))


def _mixed(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(18):
            w, h = SHAPES[i % len(SHAPES)]
            Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(root / f"{i:02d}.png")
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": f"image {i}"}) + "\n")
    return root


def test_bucketed_fit_from_the_latent_cache(tmp_path, ldm_assets):
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, cache_dir=str(tmp_path / "cache"), train_text_encoder=False))
    dm = ImageCaptionDataModule(root=str(_mixed(tmp_path / "mixed")), image_size=32, buckets=True, bucket_multiple=8,
                                batch_size=2, val_fraction=0.2)
    shapes = RecordShapes()
    logger = pl.loggers.TensorBoardLogger(tmp_path / "logs", name="ldm")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=6, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[shapes])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6 and torch.isfinite(trainer.callback_metrics["train/loss"])

    # The cached moments are the VAE's moments of each image as its bucket crops it; one shard set per bucket.
    cached, f = dm.cached_train_dataset, model.autoencoder.downsampling_factor
    assert sorted(p.name for p in next((tmp_path / "cache").glob("latents-*")).iterdir()) == ["24x40", "32x32", "40x24"]
    for i in range(len(cached)):
        h, w = dm.train_dataset.sizes[i]
        with torch.no_grad():
            expected = model.autoencoder.encode(dm.train_dataset.image(i)[None]).moments[0]
        assert expected.shape[-2:] == (h // f, w // f)
        assert torch.allclose(cached.moments(i), expected, atol=1e-5)
    # Every batch holds one bucket; training saw more than one shape.
    for batch in dm.train_dataloader():
        assert {dm.train_dataset.sizes[i] for i in batch["index"].tolist()} == {
            (batch["moments"].shape[-2] * f, batch["moments"].shape[-1] * f)}
    assert len(set(shapes.shapes)) > 1

    # Validation: the usual square grid, and the first prompt once per training bucket (padded into one row).
    log_dir = Path(logger.log_dir)
    assert Image.open(next((log_dir / "samples").glob("step_*.png"))).size == (2 * 33 + 1, 34)
    assert Image.open(next((log_dir / "samples_buckets").glob("step_*.png"))).size == (3 * 41 + 1, 41 + 1)
    wide = model.generate(["image 1"], steps=2, latent_size=(6, 10))
    assert wide.shape == (1, 3, 24, 40)

    # The exported model's sample size is the square base size, not a bucket's.
    pipe = LatentDiffusionPipeline.from_pretrained(model.save_pretrained(tmp_path / "export"))
    assert pipe.sample_size == 32
