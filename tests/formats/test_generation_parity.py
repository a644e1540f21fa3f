"""End-to-end parity: a whole text-to-image generation with ``LatentDiffusionPipeline`` equals diffusers'
``StableDiffusionPipeline`` given the same weights, prompts, seeds, DPM-Solver++(2M) and classifier-free guidance.

diffusers builds and saves a tiny SD v1-style pipeline (random weights, ``randomize_`` so that norms and biases
are not trivial); we load that folder with ``LatentDiffusionPipeline.from_pretrained`` and generate. What makes
the two the same computation:

- scheduler: ``DPMSolverMultistepScheduler`` with SD's ``scaled_linear`` betas 0.00085..0.012,
  ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``, ``final_sigmas_type="zero"``
  (our ``dpmpp_2m``: first-order last step into sigma = 0, whatever ``lower_order_final`` says), and the
  ``timestep_spacing`` that our call is given (overriding the folder's, which our pipeline otherwise follows);
- noise: ours draws image i's latents as ``torch.randn(latent_shape, generator=Generator().manual_seed(seed + i))``;
  diffusers' ``prepare_latents`` given one CPU generator per image draws the same numbers
  (``init_noise_sigma`` is 1 for DPM-Solver);
- CFG: both ``uncond + scale * (cond - uncond)`` (diffusers batches [uncond, cond], we [cond, uncond]);
- images: diffusers' ``"pt"`` and ``"np"`` are in [0, 1]; ours ``"np"`` is in [0, 1], ours ``"pt"`` in [-1, 1].

The final latents are captured from both (diffusers' ``callback_on_step_end``, our ``callback``) and compared
too: the images alone would be a weak check, as a random VAE decoder is contractive.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from interop_helpers import TINY_V1, randomize_, tiny_clip_config

from ldm.data.tokenizer import train_clip_tokenizer
from ldm.pipeline import LatentDiffusionPipeline

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# steps_offset=1 as in SD's configs (StableDiffusionPipeline forces 1 anyway); only 'leading' spacing uses it.
DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
                lower_order_final=True, steps_offset=1)  # fmt: skip
# f = 4: 32x32 images from 8x8x4 latents (the UNet's sample_size is 8). The final epsilon latents of this random
# model have std ~8-14, so scaling_factor=8 puts the decoder's input near unit scale, where its output responds to it
# (and checks that a non-default scaling factor is read from the folder).
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=4,
           sample_size=32, scaling_factor=8.0)  # fmt: skip
CAPTIONS = ["a red circle above a blue square", "a green triangle", "a blue square below a red circle"]
PROMPTS = ["a red circle above a blue square", "a blue square"]
NEGATIVES = ["a green triangle", ""]  # "" is the usual unconditional prompt
STEPS, GUIDANCE, SEED = 10, 5.0, 7
# Measured on CPU, fp32 (torch 2.14, diffusers 0.42.1), max |ours - diffusers|:
#   epsilon, linspace or trailing: latents 2.7e-5 / 3.1e-5 (latent std ~14: relative ~1e-6), [0, 1] images 2.4e-7
#   v-prediction, zero terminal SNR, trailing, guidance_rescale=0.7: latents 1.1e-6, images 3.6e-7
# (float32 round-off: the CFG batch runs in another order). For scale: sampling 'leading' timesteps one off
# (steps_offset 0 vs 1) moves the latents by 0.14 and the images by 8e-4.
LATENT_TOL = dict(atol=1e-4, rtol=1e-5)
IMAGE_ATOL = 1e-5


def _build(diffusers, root, **scheduler_config):
    """A tiny diffusers SD pipeline with random weights, saved with ``save_pretrained``; ours loaded from the folder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(train_clip_tokenizer(CAPTIONS * 3, root / "tok", vocab_size=530))
    n = len(tokenizer)
    clip = tiny_clip_config(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=tokenizer.pad_token_id)
    text_encoder = randomize_(CLIPTextModel(clip), seed=3, scale=0.3).eval()
    unet = randomize_(diffusers.UNet2DConditionModel(**TINY_V1), seed=1).eval()
    vae = randomize_(diffusers.AutoencoderKL(**VAE), seed=2, scale=0.3).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, **DPMPP_2M, **scheduler_config)
    reference = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(root / "sd")
    return reference, LatentDiffusionPipeline.from_pretrained(root / "sd")


def _diffusers_generate(reference, output_type: str, **kwargs):
    """diffusers' images and its final latents; one CPU generator per image, seeded SEED + i."""
    final = {}

    def keep_latents(pipe, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].clone()
        return callback_kwargs

    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        out = reference(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        generator=generators, output_type=output_type, callback_on_step_end=keep_latents, **kwargs)  # fmt: skip
    return out.images, final["latents"]


def _ours_generate(ours, output_type: str, **kwargs):
    final = {}

    def keep_latents(i, t, x):
        final["latents"] = x.clone()

    out = ours(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, sampler="dpmpp_2m",
               seed=SEED, output_type=output_type, progress=False, callback=keep_latents, **kwargs)  # fmt: skip
    assert out.seeds == [SEED, SEED + 1]
    return out.images, final["latents"]


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_epsilon_text_to_image_with_negative_prompts_and_cfg_matches_diffusers(diffusers, tmp_path, spacing):
    reference, ours = _build(diffusers, tmp_path, prediction_type="epsilon", timestep_spacing=spacing)
    assert ours.prediction_type == "epsilon" and ours.scaling_factor == 8.0 and ours.sample_size == 32

    expected, expected_latents = _diffusers_generate(reference, "pt")
    images, latents = _ours_generate(ours, "pt", timestep_spacing=spacing)
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)
    assert images.shape == expected.shape == (2, 3, 32, 32)
    torch.testing.assert_close((images + 1) / 2, expected, atol=IMAGE_ATOL, rtol=0)  # ours: [-1, 1]; diffusers: [0, 1]
    # The check has teeth: prompts and images differ well beyond the tolerance.
    assert (expected[0] - expected[1]).abs().max() > 0.05 and expected.std() > 0.05

    ours_np, _ = _ours_generate(ours, "np", timestep_spacing=spacing)
    assert ours_np.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(ours_np, expected.permute(0, 2, 3, 1).numpy(), atol=IMAGE_ATOL, rtol=0)


def test_v_prediction_zero_snr_with_guidance_rescale_matches_diffusers(diffusers, tmp_path):
    # The "Common Diffusion Noise Schedules" recipe: v-prediction, zero terminal SNR, trailing spacing, rescaled CFG.
    reference, ours = _build(diffusers, tmp_path, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                             timestep_spacing="trailing")  # fmt: skip
    assert ours.prediction_type == "v_prediction" and bool(ours.schedule.alphas_cumprod[-1] < 1e-6)

    expected, expected_latents = _diffusers_generate(reference, "np", guidance_rescale=0.7)
    images, latents = _ours_generate(ours, "np", timestep_spacing="trailing", guidance_rescale=0.7)
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)
    assert images.shape == expected.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images, expected, atol=IMAGE_ATOL, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 0.05


def test_leading_spacing_with_sd_steps_offset_matches_diffusers(diffusers, tmp_path):
    reference, ours = _build(diffusers, tmp_path, prediction_type="epsilon", timestep_spacing="leading")
    _, expected_latents = _diffusers_generate(reference, "latent")
    _, latents = _ours_generate(ours, "latent", timestep_spacing="leading")
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)


def test_one_generator_gives_diffusers_noise(diffusers, tmp_path):
    reference, ours = _build(diffusers, tmp_path, prediction_type="epsilon", timestep_spacing="trailing")
    kw = dict(num_inference_steps=2, guidance_scale=GUIDANCE, output_type="latent")
    with torch.no_grad():
        expected = reference(PROMPTS, generator=torch.Generator().manual_seed(SEED), **kw).images
    got = ours(PROMPTS, generator=torch.Generator().manual_seed(SEED), timestep_spacing="trailing", progress=False, **kw).images
    torch.testing.assert_close(got, expected, **LATENT_TOL)
