"""The folder DataModule's latent cache (ldm.data.latent_cache) without a model: a stand-in encoder, buckets, the
same items in the same order, text embeddings, reuse and a new key, per-rank shards."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data import ImageCaptionDataModule
from ldm.data.latent_cache import CachedLatentDataset

# (width, height): wide, tall and square; with image_size 32 and multiple 8 the buckets are 40x24, 32x32, 24x40.
SHAPES = [(64, 32), (32, 64), (48, 48), (60, 36)]


@pytest.fixture
def mixed(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(16):
            w, h = SHAPES[i % len(SHAPES)]
            Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)).resize((w, h)).save(root / f"{i:02d}.png")
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": [f"image {i}", f"picture {i}"]}) + "\n")
    return root


class PoolEncoder:
    """Stands in for a VAE encoder: 4x average pooling as the mean, a constant log-variance; counts images."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        mean = F.avg_pool2d(images, 4)
        return torch.cat([mean, torch.full_like(mean, -2.0)], dim=1)


def fake_text(captions: list[str]) -> torch.Tensor:
    """Stands in for a text encoder: a (3, 2) embedding from each caption's length and first character."""
    return torch.tensor([[[len(c), ord(c[0]) if c else 0]] * 3 for c in captions], dtype=torch.float32)


def _dm(root, **kw) -> ImageCaptionDataModule:
    dm = ImageCaptionDataModule(root=str(root), image_size=32, buckets=True, bucket_multiple=8, batch_size=2,
                                val_fraction=0.25, **kw)
    dm.setup("fit")
    return dm


def test_bucketed_cache_serves_each_items_moments_in_the_same_order(mixed, tmp_path):
    encoder = PoolEncoder()
    dm = _dm(mixed)
    plain = [b["index"].tolist() for b in _dm(mixed).train_dataloader()]
    assert dm.enable_latent_cache(tmp_path / "cache", encoder, "pool-v1", encode_text=fake_text,
                                  text_encoder_fingerprint="text-v1")
    cached = dm.cached_train_dataset
    assert isinstance(cached, CachedLatentDataset) and cached.dataset is dm.train_dataset  # nothing swapped
    assert cached.sizes == dm.train_dataset.sizes and len(set(cached.sizes)) == 3
    # One shard set per bucket size, never a stack of different shapes.
    assert sorted(p.name for p in next((tmp_path / "cache").glob("latents-*")).iterdir()) == ["24x40", "32x32", "40x24"]
    for i in range(len(cached)):
        h, w = cached.sizes[i]
        assert torch.equal(cached.moments(i), encoder(dm.train_dataset.image(i)[None])[0])
        assert cached.moments(i).shape == (6, h // 4, w // 4)
    batches = list(dm.train_dataloader())
    assert [b["index"].tolist() for b in batches] == plain  # the order of the uncached DataModule, seed for seed
    for batch in batches:
        assert "image" not in batch
        assert {cached.sizes[i] for i in batch["index"].tolist()} == {(batch["moments"].shape[-2] * 4, batch["moments"].shape[-1] * 4)}
        assert torch.equal(batch["context"], fake_text(batch["text"]))
        assert all(t in dm.train_dataset.records[i].captions for t, i in zip(batch["text"], batch["index"].tolist()))
    assert torch.equal(dm.empty_context, fake_text([""])[0])
    assert "image" in next(iter(dm.val_dataloader()))  # validation stays images


def test_cache_is_reused_and_rekeyed(mixed, tmp_path, caplog):
    first = PoolEncoder()
    _dm(mixed).enable_latent_cache(tmp_path / "cache", first, "pool-v1")
    assert first.images == 12
    again = PoolEncoder()
    with caplog.at_level(logging.INFO, logger="ldm.data.cache_shards"):
        _dm(mixed).enable_latent_cache(tmp_path / "cache", again, "pool-v1")
    assert again.images == 0 and "reusing the cache" in caplog.text
    other = PoolEncoder()
    _dm(mixed).enable_latent_cache(tmp_path / "cache", other, "pool-v2")  # another encoder: another cache
    assert other.images == 12 and len(list((tmp_path / "cache").glob("latents-*"))) == 2
    square = ImageCaptionDataModule(root=str(mixed), image_size=32, batch_size=2, val_fraction=0.25)
    square.enable_latent_cache(tmp_path / "cache", PoolEncoder(), "pool-v1")  # squares: shards directly in the folder
    assert len(list((tmp_path / "cache").glob("latents-*/shard-*.safetensors"))) == 1
    assert square.cached_train_dataset.moments(0).shape == (6, 8, 8)


def test_random_crops_are_not_cached(mixed, tmp_path, caplog):
    dm = _dm(mixed, crop="random")
    with caplog.at_level(logging.WARNING, logger="ldm.data.latent_cache"):
        assert not dm.enable_latent_cache(tmp_path / "cache", PoolEncoder(), "pool-v1")
    assert dm.cached_train_dataset is None and "random crops" in caplog.text and not (tmp_path / "cache").exists()
    assert "image" in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="encoder_fingerprint"):
        dm.enable_latent_cache(tmp_path / "cache", PoolEncoder(), "")


def test_each_rank_encodes_its_share_of_every_bucket(mixed, tmp_path):
    barrier, encoders, results = threading.Barrier(2, timeout=60), [PoolEncoder(), PoolEncoder()], {}

    def rank(r: int) -> None:
        dm = _dm(mixed)
        dm.enable_latent_cache(tmp_path / "cache", encoders[r], "pool-v1", rank=r, world_size=2, barrier=barrier.wait)
        results[r] = dm.cached_train_dataset

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert encoders[0].images + encoders[1].images == 12 and min(e.images for e in encoders) > 0
    for bucket in next((tmp_path / "cache").glob("latents-*")).iterdir():
        assert sorted(p.name for p in bucket.glob("shard-*")) == ["shard-00000-of-00002.safetensors",
                                                                  "shard-00001-of-00002.safetensors"]
    for i in range(len(results[0])):  # every rank reads every item
        assert torch.equal(results[0].moments(i), results[1].moments(i))
