"""The VAE's dtype in generation: fp32 by default, fp16 on request, and a half-precision decode that overflows (SDXL's
original VAE in fp16) redone in fp32 with a warning instead of NaN images."""

from __future__ import annotations

import pytest
import torch

from test_pipeline import tiny_pipeline

KW = dict(num_inference_steps=2, seed=0, output_type="pt", progress=False)


def test_vae_is_fp32_by_default_and_fp16_on_request(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tok")
    assert pipe.vae.post_quant_conv.weight.dtype == torch.float32
    pipe.to(dtype=torch.float32, vae_dtype=torch.float16)
    assert pipe.vae.post_quant_conv.weight.dtype == torch.float16
    reference = tiny_pipeline(tmp_path / "tok2")("a blue square", **KW).images
    images = pipe("a blue square", **KW).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    torch.testing.assert_close(images, reference, atol=2e-2, rtol=0)  # fp16 round-off only


def test_an_overflowing_half_precision_decode_is_redone_in_fp32(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tok")
    with torch.no_grad():  # activations beyond fp16's 65504 inside the decoder, as SDXL's VAE has at 1024 px
        pipe.vae.decoder.conv_in.weight.mul_(3e4)
        pipe.vae.decoder.conv_out.weight.div_(3e4)
    expected = pipe("a blue square", **KW).images
    assert torch.isfinite(expected).all()
    pipe.to(vae_dtype=torch.float16)
    with pytest.warns(UserWarning, match="gave NaN or infinite values.*redone"):
        images = pipe("a blue square", **KW).images
    assert torch.isfinite(images).all() and pipe.vae.post_quant_conv.weight.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


def test_img2img_and_inpainting_with_a_half_precision_vae(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tok")
    init = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1
    reference = (pipe.img2img("a blue square", init, strength=0.5, **KW).images,
                 pipe.inpaint("a blue square", init, mask, **KW).images)
    pipe.to(vae_dtype=torch.float16)
    got = (pipe.img2img("a blue square", init, strength=0.5, **KW).images, pipe.inpaint("a blue square", init, mask, **KW).images)
    for a, b in zip(got, reference):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)  # fp16 round-off only
