"""SDXL's size micro-conditioning recorded by the data layer: each item's original size and where its crop was cut,
for square and bucketed, centre and random crops, from live images and from the latent cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.dataset import ImageCaptionDataset
from ldm.data.records import ImageRecord
from ldm.data.transforms import build_transform

SIZES = [(50, 30), (30, 70), (40, 40), (97, 33)]  # (width, height)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path, [ImageRecord(f"{i}.png", [f"image {i}"]) for i in range(len(SIZES))]


def test_centre_crops_record_original_size_and_offset_as_the_cache_computes_them(images):
    root, records = images
    square = ImageCaptionDataset(root, records, image_size=24)
    buckets = ImageCaptionDataset(root, records, image_size=24, sizes=[(32, 64), (64, 32), (48, 48), (32, 64)])
    # 50x30 -> 40x24, cut 8 from the left; 30x70 -> 24x56, 16 from the top; 97x33 -> 70x24 (torchvision rounds down)
    expected_square = [[30, 50, 0, 8], [70, 30, 16, 0], [40, 40, 0, 0], [33, 97, 0, 23]]
    for ds, expected in ((square, expected_square), (buckets, None)):
        for i in range(len(records)):
            live = ds[i]["size_conditioning"]
            torch.testing.assert_close(live, ds.size_conditioning(i))  # the cache's header-only figure
            assert live[:2].tolist() == [SIZES[i][1], SIZES[i][0]]
            if expected is not None:
                assert live.tolist() == expected[i]


def test_random_crops_record_where_they_cut_and_keep_torchvisions_draws(images):
    root, records = images
    ds = ImageCaptionDataset(root, records, image_size=24, crop="random")
    torch.manual_seed(1)
    offsets = {tuple(ds[1]["size_conditioning"][2:].tolist()) for _ in range(30)}  # 30x70 -> 24x56: top in 0..32
    assert len(offsets) > 5 and all(0 <= top <= 32 and left == 0 for top, left in offsets)
    # The same pixels as torchvision's RandomCrop with the same draws (the transform before size recording).
    from torchvision.transforms import v2

    reference = v2.Compose([v2.Resize(24, antialias=True), v2.RandomCrop(24), *build_transform(24).transforms[2:]])
    image = Image.open(root / "1.png").convert("RGB")
    torch.manual_seed(5)
    ours = build_transform(24, crop="random")(image)
    torch.manual_seed(5)
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), reference(image).as_subclass(torch.Tensor))
    # The recorded offset is where the cut was: the resized image cropped there is the item's image.
    to_tensor = v2.Compose(build_transform(24).transforms[2:])
    resized = v2.Resize(24, antialias=True)(image)
    for seed in range(3):
        torch.manual_seed(seed)
        item = ds[1]
        top, left = (int(v) for v in item["size_conditioning"][2:])
        cut = to_tensor(resized.crop((left, top, left + 24, top + 24))).as_subclass(torch.Tensor)
        torch.testing.assert_close(item["image"], cut)
