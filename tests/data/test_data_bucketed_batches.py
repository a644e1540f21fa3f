"""Aspect-ratio buckets through the folder DataModule: one bucket per batch, the image's own bucket, and the
same bucket at the same step on every rank (so DDP batches match in shape)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ldm.data import ImageCaptionDataModule
from ldm.data.buckets import assign_bucket

# (width, height): wide, tall and square images.
SHAPES = [(64, 32), (96, 48), (32, 64), (40, 80), (48, 48), (64, 64), (80, 40), (36, 72)]


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(48):
            w, h = SHAPES[i % len(SHAPES)]
            Image.new("RGB", (w, h), (i * 5 % 255, 80, 160)).save(root / f"{i:02d}.png")
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": f"image {i}"}) + "\n")
    return root


def _module(root, **kw):
    dm = ImageCaptionDataModule(root=str(root), image_size=64, buckets=True, bucket_multiple=16, batch_size=3,
                                val_fraction=0.25, seed=4, **kw)
    dm.setup("fit")
    return dm


def test_every_batch_holds_one_bucket_the_images_own(mixed):
    dm = _module(mixed)
    # 64 x 64 = 4096 pixels at most, sides multiples of 16, aspect ratio within 2: tall, square and wide.
    assert dm.bucket_sizes == [(80, 48), (64, 64), (48, 80)]
    shapes = set()
    records = dm.train_dataset.records
    for batch in dm.train_dataloader():
        h, w = batch["image"].shape[-2:]
        shapes.add((h, w))
        for i in batch["index"].tolist():
            width, height = dm.image_sizes[records[i].path]
            assert dm.bucket_sizes[assign_bucket(width, height, dm.bucket_sizes)] == (h, w)
    assert shapes == set(dm.bucket_sizes)  # wide, tall and square batches all occur
    val_shapes = [tuple(b["image"].shape[-2:]) for b in dm.val_dataloader()]
    assert set(val_shapes) <= set(dm.bucket_sizes) and val_shapes == sorted(val_shapes)  # in order, bucket by bucket


def test_ranks_see_the_same_bucket_at_each_step(mixed, monkeypatch):
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr("ldm.data.resumable.world", lambda rank=rank: (rank, 2))
        per_rank.append([(tuple(b["image"].shape[-2:]), b["index"].tolist()) for b in _module(mixed).train_dataloader()])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert [s for s, _ in per_rank[0]] == [s for s, _ in per_rank[1]]  # step by step, the same bucket shape
    assert len({s for s, _ in per_rank[0]}) > 1  # (and more than one bucket in play)
    seen = [set(i for _, b in r for i in b) for r in per_rank]
    assert not seen[0] & seen[1]


def test_bucket_size_must_fit_the_multiple(mixed):
    with pytest.raises(ValueError, match="bucket_multiple"):
        ImageCaptionDataModule(root=str(mixed), image_size=40, buckets=True, bucket_multiple=16)
    with pytest.raises(ValueError, match="bucket_multiple"):
        ImageCaptionDataModule(root=str(mixed), image_size=64, buckets=True, bucket_multiple=0)


def test_buckets_from_streaming_shards_match_the_folder(mixed, tmp_path):
    from ldm.data.shards import SIZES_FILE, optimize_dataset
    from ldm.data.streaming import StreamingImageCaptionDataModule

    optimize_dataset(str(mixed), tmp_path / "shards", chunk_bytes="8KB", val_fraction=0.25)
    assert (tmp_path / "shards" / "train" / SIZES_FILE).is_file()
    streamed = StreamingImageCaptionDataModule(root=str(tmp_path / "shards"), image_size=64, buckets=True, bucket_multiple=16,
                                               batch_size=3, seed=4)
    streamed.setup("fit")
    folder = _module(mixed)
    bucket_of = {r.path: s for r, s in zip(folder.train_dataset.records, folder.train_dataset.sizes)}
    dataset = streamed.train_dataset
    assert [bucket_of[dataset.shards[i]["path"]] for i in range(len(dataset))] == dataset.sizes  # same bucket per image
    for batch in streamed.train_dataloader():
        assert tuple(batch["image"].shape[-2:]) in folder.bucket_sizes
        assert {dataset.sizes[i] for i in batch["index"].tolist()} == {tuple(batch["image"].shape[-2:])}
    assert {tuple(b["image"].shape[-2:]) for b in streamed.val_dataloader()} <= set(folder.bucket_sizes)
    (tmp_path / "shards" / "train" / SIZES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="ldm data optimize"):
        StreamingImageCaptionDataModule(root=str(tmp_path / "shards"), image_size=64, buckets=True, bucket_multiple=16).setup("fit")
