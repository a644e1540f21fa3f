"""Shared fixtures: tiny on-disk datasets that the tests build themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tiny_dataset(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """``n`` random blocky RGB images with captions, in the metadata.jsonl format."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.NEAREST).save(root / "images" / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"images/{i:03d}.png", "text": [f"image {i}", f"picture {i}"]}) + "\n")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny")


# A few-thousand-parameter autoencoder: f=4, 8x8x4 latents from 32x32 images.
TINY_VAE = dict(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=32, z_channels=4, norm_groups=4, disc_ndf=8, disc_layers=2)


@pytest.fixture
def tiny_vae_kwargs() -> dict:
    return dict(TINY_VAE)
