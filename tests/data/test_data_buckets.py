"""Aspect-ratio buckets: bucket sizes, assignment, grouping, the bucket transform, kept pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import (
    assign_bucket,
    assign_buckets,
    bucket_sizes,
    bucket_transform,
    compare_with_square,
    cover_crop_size,
    group_by_bucket,
    kept_pixel_fraction,
)
from ldm.data.dataset import build_transform

# base 256, multiple 64: w=256 -> h=256; w=320 -> 65536/320=204.8 -> 192 (ratio 5/3);
# w=384 -> 170.7 -> 128 (ratio 3 > 2, stop). Plus transposes, sorted tallest to widest.
SIZES_256 = [(320, 192), (256, 256), (192, 320)]
TALL, SQUARE, WIDE = 0, 1, 2
# base 64, multiple 16 (small enough for fast transform tests): w=80 -> 4096/80=51.2 -> 48.
SIZES_64 = [(80, 48), (64, 64), (48, 80)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _to_model_range(image: Image.Image) -> torch.Tensor:
    """The expected [-1, 1] tensor of an image with no resizing, computed by hand."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 * 2 - 1


# --- bucket_sizes ---------------------------------------------------------------------------


def test_bucket_sizes_hand_computed():
    assert bucket_sizes(256) == SIZES_256
    # w=576 -> 262144/576=455.1 -> 448; w=640 -> 409.6 -> 384; w=704 -> 372.4 -> 320 (2.2 > 2).
    assert bucket_sizes(512) == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    assert bucket_sizes(64, multiple=16) == SIZES_64
    assert bucket_sizes(512, max_ratio=1) == [(512, 512)]


@pytest.mark.parametrize(
    "base, multiple, max_ratio",
    [(256, 64, 2.0), (512, 64, 2.0), (768, 64, 2.0), (1024, 64, 2.0), (1024, 64, 3.0), (256, 16, 4.0),
     (96, 16, 1.5)],
)
def test_bucket_sizes_budget_multiples_ratio_symmetry(base, multiple, max_ratio):
    sizes = bucket_sizes(base, multiple, max_ratio)
    assert (base, base) in sizes
    assert len(set(sizes)) == len(sizes)
    assert set(sizes) == {(w, h) for h, w in sizes}
    ratios = [w / h for h, w in sizes]
    assert ratios == sorted(ratios)
    for h, w in sizes:
        assert h % multiple == 0 and w % multiple == 0
        assert h * w <= base * base
        assert h * w > base * base - multiple * max(h, w)  # less than one strip short
        assert 1 / max_ratio <= w / h <= max_ratio
    assert len(sizes) > 1  # every case above leaves room for non-square buckets


def test_bucket_sizes_keep_about_the_square_pixel_count_at_sd_scales():
    for base in (512, 768, 1024):
        assert all(h * w >= 0.9 * base * base for h, w in bucket_sizes(base))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_size": 0}, "base_size"),
        ({"base_size": 250}, "multiple"),
        ({"base_size": 256, "multiple": 0}, "multiple"),
        ({"base_size": 256, "max_ratio": 0.5}, "max_ratio"),
        ({"base_size": 256, "max_ratio": float("nan")}, "max_ratio"),
        ({"base_size": 256.0}, "base_size"),
    ],
)
def test_bucket_sizes_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bucket_sizes(**kwargs)


# --- assignment and grouping ----------------------------------------------------------------


def test_wide_tall_and_square_images_go_to_matching_buckets():
    assert assign_bucket(512, 256, SIZES_256) == WIDE
    assert assign_bucket(256, 512, SIZES_256) == TALL
    assert assign_bucket(300, 300, SIZES_256) == SQUARE
    # 4:3: |log(4/3) - log(1)| = 0.288 > |log(4/3) - log(5/3)| = log(5/4) = 0.223 -> wide.
    assert assign_bucket(400, 300, SIZES_256) == WIDE
    assert assign_bucket(300, 400, SIZES_256) == TALL
    # 7:6: log(7/6) = 0.154 < |log(7/6) - log(5/3)| = 0.357 -> square.
    assert assign_bucket(350, 300, SIZES_256) == SQUARE
    assert assign_bucket(1, 1000, SIZES_256) == TALL


def test_assignment_is_deterministic_with_ties_to_the_lowest_index():
    # A square image is exactly as far from 2:1 as from 1:2; either order picks index 0.
    assert assign_bucket(100, 100, [(128, 256), (256, 128)]) == 0
    assert assign_bucket(100, 100, [(256, 128), (128, 256)]) == 0
    assert assign_bucket(30, 20, [(64, 64), (64, 64), (32, 64)]) == 2
    assert assign_bucket(20, 20, [(64, 64), (32, 32)]) == 0
    images = [(512, 256), (256, 512), (300, 300), (400, 300), (300, 400), (1000, 3)]
    first = assign_buckets(images, SIZES_256)
    assert first == [assign_bucket(w, h, SIZES_256) for w, h in images]
    assert first == assign_buckets(images, SIZES_256) == [WIDE, TALL, SQUARE, WIDE, TALL, WIDE]


def test_assignment_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        assign_bucket(10, 10, [])
    with pytest.raises(ValueError, match=r"sizes\[1\]"):
        assign_bucket(10, 10, [(64, 64), (0, 64)])
    with pytest.raises(ValueError, match="width"):
        assign_bucket(0, 10, SIZES_256)
    with pytest.raises(ValueError, match=r"image_sizes\[1\]"):
        assign_buckets([(10, 10), (10, -1)], SIZES_256)


def test_group_by_bucket_keeps_item_order_and_sorts_buckets():
    groups = group_by_bucket([2, 0, 2, 1, 0])
    assert groups == {0: [1, 4], 1: [3], 2: [0, 2]}
    assert list(groups) == [0, 1, 2]
    assert group_by_bucket([]) == {}
    with pytest.raises(ValueError, match=r"assignments\[1\]"):
        group_by_bucket([0, -1])


# --- the transform --------------------------------------------------------------------------


@pytest.mark.parametrize("crop", ["center", "random"])
@pytest.mark.parametrize("height, width", SIZES_64)
def test_transform_gives_exact_bucket_shape_in_range(crop, height, width):
    transform = bucket_transform(height, width, crop=crop, random_flip=crop == "random")
    image_sizes = [
        (1, 1), (2, 3), (7, 5), (48, 80), (80, 48), (64, 64),
        (200, 100), (100, 200), (1, 1000), (1000, 1), (333, 77),
    ]
    for i, (w, h) in enumerate(image_sizes):
        out = transform(_noise(w, h, seed=i))
        assert out.shape == (3, height, width), (w, h)
        assert out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("crop", ["center", "random"])
def test_image_already_at_bucket_size_is_only_normalised(crop):
    image = _noise(80, 48)
    out = bucket_transform(48, 80, crop=crop)(image)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), _to_model_range(image), atol=1e-6, rtol=0)


def test_square_bucket_matches_build_transform():
    for w, h in [(48, 48), (32, 32), (64, 32), (32, 70)]:
        image = _noise(w, h)
        expected = build_transform(32)(image)
        torch.testing.assert_close(bucket_transform(32, 32)(image), expected, atol=1e-6, rtol=0)


def _bands(width: int, height: int, horizontal: bool) -> Image.Image:
    """Three equal red/green/blue bands: side by side (horizontal) or stacked."""
    image = Image.new("RGB", (width, height), (0, 255, 0))
    if horizontal:
        image.paste((255, 0, 0), (0, 0, width // 3, height))
        image.paste((0, 0, 255), (2 * width // 3, 0, width, height))
    else:
        image.paste((255, 0, 0), (0, 0, width, height // 3))
        image.paste((0, 0, 255), (0, 2 * height // 3, width, height))
    return image


GREEN = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)


def test_centre_crop_keeps_the_middle_and_resizes_to_cover():
    # 144 x 48 into 48 x 48: no resize, the middle 48 columns are the green band.
    out = bucket_transform(48, 48)(_bands(144, 48, horizontal=True))
    torch.testing.assert_close(out.as_subclass(torch.Tensor), GREEN.expand(3, 48, 48))
    # 96 wide x 288 tall into 48 x 80: scale = max(48/288, 80/96) = 5/6, so the full width stays
    # and 96 * 48 / 80 = 57.6 -> 58 rows survive, from row round((288 - 58) / 2) = 115 to 173:
    # inside the green band (rows 96..192).
    assert cover_crop_size(96, 288, 48, 80) == (58, 96)
    out = bucket_transform(48, 80)(_bands(96, 288, horizontal=False))
    torch.testing.assert_close(out.as_subclass(torch.Tensor), GREEN.expand(3, 48, 80))


def test_random_crop_takes_windows_of_the_image_and_varies():
    ramp = np.tile(np.arange(160, dtype=np.uint8)[None, :, None], (32, 1, 3))  # column index as value
    image = Image.fromarray(ramp)
    transform = bucket_transform(32, 32, crop="random")
    lefts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image).as_subclass(torch.Tensor)
        left = round(float((out[0, 0, 0] + 1) / 2 * 255))
        torch.testing.assert_close(out, _to_model_range(image.crop((left, 0, left + 32, 32))))
        lefts.add(left)
    assert len(lefts) > 1


def test_random_flip_gives_the_image_or_its_mirror():
    image = _noise(48, 80)
    plain = _to_model_range(image)
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out = bucket_transform(80, 48, random_flip=True)(image).as_subclass(torch.Tensor)
        if torch.allclose(out, plain, atol=1e-6, rtol=0):
            seen.add("plain")
        else:
            torch.testing.assert_close(out, plain.flip(-1), atol=1e-6, rtol=0)
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="crop"):
        bucket_transform(64, 64, crop="top")
    with pytest.raises(ValueError, match="height"):
        bucket_transform(0, 64)


# --- kept pixels ----------------------------------------------------------------------------


def test_kept_pixel_fraction_by_hand():
    assert kept_pixel_fraction(640, 384, 192, 320) == pytest.approx(1.0)  # both 5:3
    assert kept_pixel_fraction(512, 256, 256, 256) == pytest.approx(0.5)  # 256x256 of 512x256
    assert kept_pixel_fraction(256, 512, 256, 256) == pytest.approx(0.5)
    assert kept_pixel_fraction(400, 300, 256, 256) == pytest.approx(0.75)  # 300x300 of 400x300
    # 2:1 into 5:3 keeps 320x192 scaled: full height 256, width 256*5/3 = 426.7 of 512 -> 5/6.
    assert kept_pixel_fraction(512, 256, 192, 320) == pytest.approx(5 / 6)
    # Matches the crop box where rounding is exact: 600 x 300 into 192 x 320 keeps 300 x 500.
    assert cover_crop_size(600, 300, 192, 320) == (300, 500)
    assert kept_pixel_fraction(600, 300, 192, 320) == pytest.approx(300 * 500 / (600 * 300))
    with pytest.raises(ValueError, match="target_w"):
        kept_pixel_fraction(10, 10, 10, 0)


def test_buckets_keep_more_pixels_than_square_crops_on_mixed_aspects():
    images = [(512, 256), (256, 512), (300, 300), (400, 300), (300, 400)]
    report = compare_with_square(images, 256, bucket_sizes(256))
    # square: 1/2, 1/2, 1, 3/4, 3/4 -> 3.5 / 5 = 0.7
    # buckets (2:1 and 4:3 -> 5:3, mirrored for portrait): 5/6, 5/6, 1, (4/3)/(5/3)=4/5, 4/5
    #   -> (5/3 + 1 + 8/5) / 5 = 64/75
    assert report["num_images"] == 5
    assert report["square_kept"] == pytest.approx(0.7)
    assert report["bucket_kept"] == pytest.approx(64 / 75)
    assert report["bucket_counts"] == {(320, 192): 2, (256, 256): 1, (192, 320): 2}
    assert list(report["bucket_counts"]) == SIZES_256


def test_more_buckets_keep_at_least_as_much_on_a_mixed_set():
    rng = np.random.default_rng(0)
    images = [(int(w), int(h)) for w, h in rng.integers(50, 2000, size=(200, 2))]
    coarse = compare_with_square(images, 512, bucket_sizes(512))
    fine = compare_with_square(images, 1024, bucket_sizes(1024))
    # base 1024's aspect ratios include all of base 512's, so no image can end up further off.
    assert {w / h for h, w in bucket_sizes(512)} <= {w / h for h, w in bucket_sizes(1024)}
    assert coarse["bucket_kept"] > coarse["square_kept"]
    assert fine["square_kept"] == pytest.approx(coarse["square_kept"])
    assert fine["bucket_kept"] >= coarse["bucket_kept"]
    assert sum(fine["bucket_counts"].values()) == 200
    with pytest.raises(ValueError, match="image_sizes"):
        compare_with_square([], 256, SIZES_256)


def test_nearest_aspect_bucket_keeps_the_most_pixels():
    """Assignment by log aspect ratio also maximises kept pixels: the fraction is exp(-distance)."""
    sizes = bucket_sizes(1024)
    for w, h in [(1920, 1080), (1080, 1920), (4000, 3000), (3000, 2000), (1000, 1000), (2100, 900)]:
        bucket_h, bucket_w = sizes[assign_bucket(w, h, sizes)]
        chosen = kept_pixel_fraction(w, h, bucket_h, bucket_w)
        assert chosen == pytest.approx(max(kept_pixel_fraction(w, h, *size) for size in sizes))
        assert chosen == pytest.approx(math.exp(-abs(math.log(w / h) - math.log(bucket_w / bucket_h))))
