"""``ldm data encode`` with aspect-ratio buckets: each item at its bucket's latent shape, batches of one bucket from
PrecomputedLatentsDataModule, and a LatentDiffusion fit on them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule, PrecomputedLatentsDataModule, PrecomputedLatentsDataset
from ldm.data.precomputed_writer import size_batches
from ldm.models import AutoencoderKL, LatentDiffusion
from ldm.precompute import encode_dataset

# (width, height): wide, tall and square; image_size 32 with multiple 8 gives buckets 40x24, 32x32 and 24x40 (h x w).
SHAPES = [(64, 32), (32, 64), (48, 48), (60, 36)]
BUCKETS = dict(buckets=True, bucket_multiple=8)


@pytest.fixture
def mixed(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(24):
            w, h = SHAPES[(i * 7) % len(SHAPES)]
            Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)).resize((w, h)).save(root / f"{i:02d}.png")
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": [f"image {i}", f"picture {i}"]}) + "\n")
    return root


def test_size_batches_hold_one_size_and_stay_near_index_order():
    sizes = [(1, 1) if i % 5 else (2, 2) for i in range(40)]
    batches = size_batches(range(3, 40), sizes, batch_size=4, window=8)
    assert sorted(i for b in batches for i in b) == list(range(3, 40))
    assert all(len({sizes[i] for i in b}) == 1 and len(b) <= 4 for b in batches)
    # The rare size is cut early rather than holding back everything after its first item.
    done, waiting = set(), 3
    for batch in batches:
        done |= set(batch)
        while waiting in done:
            waiting += 1
        assert len(done) - (waiting - 3) <= 8 + 4
    assert size_batches(range(5), None, 2) == [[0, 1], [2, 3], [4]]


def test_bucketed_encode_trains_one_bucket_per_batch(tmp_path, mixed, ldm_assets):
    summary = encode_dataset(str(mixed), ldm_assets["vae"], tmp_path / "latents", batch_size=3, part_size=8, device="cpu",
                             val_fraction=0.25, image_size=32, **BUCKETS)
    info = summary.info
    assert info["buckets"]["sizes"] == [[40, 24], [32, 32], [24, 40]]
    dm = ImageCaptionDataModule(root=str(mixed), image_size=32, val_fraction=0.25, **BUCKETS)
    dm.setup("fit")
    vae = AutoencoderKL.from_pretrained(ldm_assets["vae"]).vae.eval()
    for split, images in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        ds = PrecomputedLatentsDataset(tmp_path / "latents", split, train=False)
        assert ds.sizes == images.sizes and len(set(ds.sizes)) > 1
        for i in range(len(ds)):
            with torch.no_grad():
                expected = vae.encode(images.image(i)[None]).moments[0]
            h, w = images.sizes[i]
            assert ds[i]["moments"].shape == (8, h // 4, w // 4) and ds[i]["index"] == i
            assert torch.allclose(ds[i]["moments"], expected, atol=1e-5), (split, i)
    # Rerunning with buckets off is another encode, not a resume of this one.
    with pytest.raises(FileExistsError):
        encode_dataset(str(mixed), ldm_assets["vae"], tmp_path / "latents", batch_size=3, part_size=8, device="cpu",
                       val_fraction=0.25, image_size=32)

    data = PrecomputedLatentsDataModule(str(tmp_path / "latents"), batch_size=2)
    data.setup()
    assert data.bucket_counts == dm.bucket_counts
    for loader in (data.train_dataloader(), data.val_dataloader()):
        for batch in loader:
            sizes = {loader.dataset.dataset.sizes[i] for i in batch["index"].tolist()}
            assert sizes == {(batch["moments"].shape[-2] * 4, batch["moments"].shape[-1] * 4)}

    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
