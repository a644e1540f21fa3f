"""Pixels kept by aspect-ratio buckets vs square crops, on a seeded mixed-aspect set of image sizes.

Image sizes are drawn from common photo aspect ratios (1:1, 4:3, 3:2, 16:9, 9:16, 2:3, 3:4, equally
likely) with a short side uniform in [256, 2048). For each base size the script prints the mean
fraction of each image's area that survives resize-and-crop with the square crop and with buckets
(`ldm.data.buckets`), and how many images each bucket receives. No images are opened: the kept
fraction depends only on aspect ratios.

    .venv/bin/python benchmarks/bucket_pixels.py [--images 10000] [--seed 0] [--bases 256 512]
"""

from __future__ import annotations

import argparse
import random

from ldm.data.buckets import bucket_sizes, compare_with_square

PHOTO_RATIOS = ((1, 1), (4, 3), (3, 2), (16, 9), (9, 16), (2, 3), (3, 4))  # width : height


def mixed_image_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` seeded ``(width, height)`` sizes with common photo aspect ratios."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        ratio_w, ratio_h = rng.choice(PHOTO_RATIOS)
        short = rng.randrange(256, 2048)
        if ratio_w >= ratio_h:
            sizes.append((round(short * ratio_w / ratio_h), short))
        else:
            sizes.append((short, round(short * ratio_h / ratio_w)))
    return sizes


def report(image_sizes: list[tuple[int, int]], base_size: int, multiple: int) -> None:
    """Print the kept-pixel comparison and the bucket histogram for one base size."""
    sizes = bucket_sizes(base_size, multiple)
    result = compare_with_square(image_sizes, base_size, sizes)
    print(f"base {base_size} (multiple {multiple}, {len(sizes)} buckets, {result['num_images']} images)")
    print(f"  mean kept pixels, square crop: {result['square_kept']:.4f}")
    print(f"  mean kept pixels, buckets:     {result['bucket_kept']:.4f}")
    for (height, width), count in result["bucket_counts"].items():
        share = count / result["num_images"]
        print(f"  {height:>5} x {width:<5} ratio {width / height:5.3f}  {count:>6}  {share:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="number of image sizes to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bases", type=int, nargs="+", default=[256, 512], help="bucket base sizes")
    parser.add_argument("--multiple", type=int, default=64, help="VAE factor x UNet downsampling")
    args = parser.parse_args()
    image_sizes = mixed_image_sizes(args.images, args.seed)
    for base in args.bases:
        report(image_sizes, base, args.multiple)


if __name__ == "__main__":
    main()
