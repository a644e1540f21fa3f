"""End-to-end SDXL parity: ``LatentDiffusionPipeline`` on a tiny random-weight SDXL-shaped diffusers folder equals
diffusers' ``StableDiffusionXLPipeline``: same seeds, DPM-Solver++(2M), CFG, both text encoders (penultimate hidden
states, the second's projected pooled output), ``prompt_2``, micro-conditioning and its negative twin, and the zero
unconditional embeddings of ``force_zeros_for_empty_prompt``. The tolerances are those of the SD 1.x/2.x parity tests
(``test_generation_parity.py``); the final latents are compared as well as the images.

One deliberate difference: given negative micro-conditioning that differs from the positive one and more than one
prompt, diffusers' SDXL pipeline (0.42) repeats ``[negative ids, positive ids]`` over the CFG batch, so half of each
branch gets the other branch's ids (its ``add_time_ids.repeat(batch_size, 1)`` after the concatenation). We give each
branch its own ids, as SGM does; the negative micro-conditioning is therefore compared on one prompt.
"""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import TINY_SDXL_UNET_DIFFUSERS, randomize_, tiny_clip_config

from ldm.data.tokenizer import train_clip_tokenizer
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.pipeline import LatentDiffusionPipeline

from test_generation_parity import DPMPP_2M, IMAGE_ATOL, LATENT_TOL, SD_BETAS, VAE

CAPTIONS = ["a red circle above a blue square", "a green triangle", "a blue square below a red circle"]
PROMPTS = ["a red circle above a blue square", "a blue square"]
PROMPTS_2 = ["a green triangle", "a red circle"]
NEGATIVES = ["a green triangle", ""]
STEPS, GUIDANCE, SEED = 8, 5.0, 11
MICRO = dict(original_size=(64, 48), crops_coords_top_left=(8, 0), target_size=(32, 32),
             negative_original_size=(16, 16), negative_crops_coords_top_left=(0, 4), negative_target_size=(32, 32))


def _build(diffusers, root, force_zeros: bool = True):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(train_clip_tokenizer(CAPTIONS * 3, root / "tok", vocab_size=530))
    n = len(tokenizer)
    ids = dict(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=tokenizer.pad_token_id)
    text_encoder = randomize_(CLIPTextModel(tiny_clip_config(**ids)), seed=3, scale=0.3).eval()  # 16 wide
    text_encoder_2 = randomize_(CLIPTextModelWithProjection(tiny_clip_config(**ids, projection_dim=16)), seed=4,
                                scale=0.3).eval()  # 16 wide, pooled 16: context 32, vector 16 + 6 x 8 = 64
    unet = randomize_(diffusers.UNet2DConditionModel(**TINY_SDXL_UNET_DIFFUSERS), seed=1).eval()
    vae = randomize_(diffusers.AutoencoderKL(**VAE), seed=2, scale=0.3).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, **DPMPP_2M, timestep_spacing="trailing")
    reference = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                    tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                                    force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(root / "sdxl")
    return reference, LatentDiffusionPipeline.from_pretrained(root / "sdxl")


def _diffusers_generate(reference, output_type="pt", **kwargs):
    final = {}

    def keep_latents(pipe, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].clone()
        return callback_kwargs

    prompts = kwargs.pop("prompt", PROMPTS)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(prompts))]
    with torch.no_grad():
        out = reference(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators, height=32,
                        width=32, output_type=output_type, callback_on_step_end=keep_latents, **kwargs)
    return out.images, final["latents"]


def _ours_generate(ours, output_type="pt", **kwargs):
    final = {}

    def keep_latents(i, t, x):
        final["latents"] = x.clone()

    prompts = kwargs.pop("prompt", PROMPTS)
    out = ours(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, sampler="dpmpp_2m", seed=SEED, height=32,
               width=32, output_type=output_type, progress=False, callback=keep_latents, **kwargs)
    return out.images, final["latents"]


def test_sdxl_with_negative_prompts_prompt_2_and_micro_conditioning_matches_diffusers(diffusers, tmp_path):
    reference, ours = _build(diffusers, tmp_path)
    assert isinstance(ours.text_encoder, DualTextEncoder) and ours.unet.config.adm_in_channels == 64
    micro = {k: v for k, v in MICRO.items() if not k.startswith("negative_")}  # both branches: see the docstring
    kwargs = dict(negative_prompt=NEGATIVES, prompt_2=PROMPTS_2, negative_prompt_2=["", "a blue square"], **micro)
    expected, expected_latents = _diffusers_generate(reference, **kwargs)
    images, latents = _ours_generate(ours, **kwargs)
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)
    torch.testing.assert_close((images + 1) / 2, expected, atol=IMAGE_ATOL, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 0.05 and expected.std() > 0.05

    # Every input matters at this tolerance: other micro-conditioning, or no prompt_2, moves the latents.
    _, other_size = _ours_generate(ours, **{**kwargs, "original_size": (32, 32)})
    _, no_prompt_2 = _ours_generate(ours, **{k: v for k, v in kwargs.items() if k != "prompt_2"})
    for other in (other_size, no_prompt_2):
        assert (other - latents).abs().max() > 100 * LATENT_TOL["atol"]


def test_sdxl_negative_micro_conditioning_matches_diffusers_for_one_prompt(diffusers, tmp_path):
    reference, ours = _build(diffusers, tmp_path)
    _, expected = _diffusers_generate(reference, "latent", prompt=PROMPTS[:1], negative_prompt=NEGATIVES[:1], **MICRO)
    _, latents = _ours_generate(ours, "latent", prompt=PROMPTS[:1], negative_prompt=NEGATIVES[:1], **MICRO)
    torch.testing.assert_close(latents, expected, **LATENT_TOL)
    micro = {k: v for k, v in MICRO.items() if not k.startswith("negative_")}
    _, same_ids = _ours_generate(ours, "latent", prompt=PROMPTS[:1], negative_prompt=NEGATIVES[:1], **micro)
    assert (same_ids - latents).abs().max() > 100 * LATENT_TOL["atol"]  # the negative ids reach the output


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_without_negative_prompt_follows_force_zeros_for_empty_prompt(diffusers, tmp_path, force_zeros):
    reference, ours = _build(diffusers, tmp_path, force_zeros=force_zeros)
    assert ours.force_zeros_for_empty_prompt is force_zeros
    _, expected_latents = _diffusers_generate(reference, "latent")
    _, latents = _ours_generate(ours, "latent")
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)


def test_sdxl_folder_written_by_us_loads_in_diffusers_and_generates_the_same(diffusers, tmp_path):
    _, ours = _build(diffusers, tmp_path)
    out = ours.save_pretrained(tmp_path / "ours", format="diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
    again.set_progress_bar_config(disable=True)
    again.scheduler = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, **DPMPP_2M, timestep_spacing="trailing")
    micro = {k: v for k, v in MICRO.items() if not k.startswith("negative_")}
    _, expected_latents = _diffusers_generate(again, "latent", negative_prompt=NEGATIVES, **micro)
    _, latents = _ours_generate(LatentDiffusionPipeline.from_pretrained(out), "latent", negative_prompt=NEGATIVES, **micro)
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)


def test_sdxl_only_arguments_are_refused_for_an_sd_model_and_checked_for_sdxl(diffusers, tmp_path):
    _, ours = _build(diffusers, tmp_path)
    with pytest.raises(ValueError, match="prompt_2 has 3 entries but there are 2 prompts"):
        ours(PROMPTS, prompt_2=["a", "b", "c"], num_inference_steps=1, progress=False, output_type="latent")
    with pytest.raises(ValueError, match="pairs of numbers >= 0"):
        ours(PROMPTS, original_size=(-1, 32), num_inference_steps=1, progress=False, output_type="latent")
