"""Shared fixtures: tiny on-disk datasets that the tests build themselves."""

from __future__ import annotations

from ldm.threads import apply_thread_policy

apply_thread_policy()  # before torch loads: on a busy machine OpenMP threads sleep while waiting (ldm/threads.py)

import json  # noqa: E402
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
TINY_VAE_SHAPE = dict(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=32, z_channels=4, norm_groups=4)
TINY_VAE = dict(vae=TINY_VAE_SHAPE, disc_ndf=8, disc_layers=2)  # AutoencoderKL arguments


@pytest.fixture
def tiny_vae_kwargs() -> dict:
    return {**TINY_VAE, "vae": dict(TINY_VAE_SHAPE)}


# A tiny text-conditional UNet (f=4 latents of 8x8x4 from the tiny VAE).
TINY_UNET = dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_head_channels=8, norm_groups=8)
TINY_TEXT = dict(hidden_size=16, num_layers=1, num_heads=2)


def make_ldm_assets(root: Path) -> dict[str, Path]:
    """A tiny captioned dataset, a saved tiny autoencoder (scaling factor measured) and a tokenizer."""
    import torch

    from ldm.data.tokenizer import train_clip_tokenizer
    from ldm.models import AutoencoderKL

    data = write_tiny_dataset(root / "data", n=24)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    vae.scaling_factor.fill_(0.5)
    vae.save_pretrained(root / "vae")
    captions = [f"image {i}" for i in range(24)] + [f"picture {i}" for i in range(24)]
    tokenizer = train_clip_tokenizer(captions, root / "tokenizer", vocab_size=600)
    return {"data": data, "vae": root / "vae", "tokenizer": Path(tokenizer)}


def ddp_ldm_assets(root: Path) -> dict[str, Path]:
    """`make_ldm_assets` for a DDP test script: rank 0 runs first and builds them; rank 1, launched after, reuses them."""
    if not (root / "vae" / "config.json").exists():
        make_ldm_assets(root)
    return {"data": root / "data", "vae": root / "vae", "tokenizer": root / "tokenizer"}


def fit_two_rank_ddp(model, out: Path, assets: dict[str, Path], **trainer_kwargs):
    """Fit ``model`` for 2 epochs on the assets' data in a 2-process CPU DDP (gloo) run without a logger, progress bar or
    sanity check (one validation batch); ``trainer_kwargs`` add to or replace those settings. Returns the Trainer."""
    import lightning.pytorch as pl

    from ldm.data import ImageCaptionDataModule

    settings = dict(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=1,
                    num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=out)
    trainer = pl.Trainer(**{**settings, **trainer_kwargs})
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=0.25))
    return trainer


def tiny_ldm_kwargs(assets: dict[str, Path], **overrides) -> dict:
    """LatentDiffusion arguments of a tiny model; a group given as a dict (``validation={"steps": 2}``) updates only
    those fields of the group."""
    kwargs = dict(
        autoencoder=str(assets["vae"]),
        tokenizer=str(assets["tokenizer"]),
        text_encoder_config=TINY_TEXT,
        train_text_encoder=True,
        unet=TINY_UNET,
        optimizer={"learning_rate": 1e-3},
        validation={"prompts": ["image 1", "picture 2"], "steps": 3},
    )
    for group in ("objective", "optimizer", "validation"):
        if isinstance(overrides.get(group), dict):
            overrides[group] = {**kwargs.get(group, {}), **overrides[group]}
    return {**kwargs, **overrides}


def save_tiny_base_model(root: Path) -> tuple[dict[str, Path], Path]:
    """A tiny untrained LatentDiffusion exported as an ldm folder, standing in for a pretrained model: its
    zero-initialised output layers (CompVis init) get random weights, as a trained model's are not zero."""
    import lightning.pytorch as pl
    import torch

    from ldm.models import LatentDiffusion

    assets = make_ldm_assets(root / "assets")
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets))
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return assets, model.save_pretrained(root / "ours")


@pytest.fixture
def ldm_assets(tmp_path: Path) -> dict[str, Path]:
    return make_ldm_assets(tmp_path / "assets")


def run_ddp_script(script: Path, out: Path, timeout: float = 240) -> None:
    """Run a 2-process DDP training script in a subprocess (Lightning's DDP launcher re-executes its
    command line for rank 1, which pytest's cannot be). Fails the test with the output on error or hang."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port, so concurrent DDP runs on this machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # Its own session, so a hung rank can be killed with its launcher.
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("DDP run hung:\n" + output[-3000:])
    assert proc.returncode == 0, output[-5000:]


@pytest.fixture(scope="session")
def diffusers():
    """diffusers, the test-only oracle (never imported by ldm itself)."""
    return pytest.importorskip("diffusers")


def finish_or_kill(proc, timeout: float, what: str) -> str:
    """``proc``'s output once it exits; past ``timeout`` s, kill its whole session (start it with
    ``start_new_session=True``) and fail the test with the output's tail."""
    import os
    import signal
    import subprocess

    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{what} (killed after {timeout} s):\n{output[-4000:]}")
    return output


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and several threads thrash on a shared 2-core machine); a module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
