"""Models exported before the format-layer refactor still load and give the same outputs.

``tests/fixtures/legacy_v0`` was written by commit 5b5482e (``make_legacy.py`` beside it): a tiny text-to-image
model exported as our folder, a tiny autoencoder folder (flat ``config.json``), and what that code generated from
them (``expected.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.formats import load_components
from ldm.models import AutoencoderKL
from ldm.pipeline import LatentDiffusionPipeline

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_v0"


def test_a_folder_exported_before_generates_what_it_generated_then():
    expected = load_file(str(LEGACY / "expected.safetensors"))
    pipe = LatentDiffusionPipeline.from_pretrained(LEGACY / "model")
    images = pipe("picture 3", num_inference_steps=4, guidance_scale=3.0, seed=2, progress=False, output_type="pt").images
    # 1e-5: the old code itself differs from its own reference by 1.3e-6 under OMP_NUM_THREADS=1 (other reduction order).
    torch.testing.assert_close(images, expected["images"], rtol=0, atol=1e-5)
    # Every reader path still takes it: decoder-only too, with the encoder's fingerprint.
    whole, half = load_components(LEGACY / "model"), load_components(LEGACY / "model", vae_encoder=False)
    assert half.vae.encoder is None and half.vae.encoder_fingerprint() == whole.vae.encoder_fingerprint()


def test_an_autoencoder_folder_with_the_flat_config_still_loads():
    expected = load_file(str(LEGACY / "expected.safetensors"))
    ae = AutoencoderKL.from_pretrained(LEGACY / "autoencoder")
    assert ae.vae.config.ch == 8 and ae.vae.config.ch_mult == (1, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(expected["ae_input"]), expected["ae_latents"], rtol=0, atol=1e-5)
