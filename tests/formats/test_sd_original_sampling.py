"""DDIM from SD single files computes what the original samplers compute.

The reference below follows the original CompVis (SD v1) / Stability (SD v2) ``DDIMSampler`` with eta = 0, written
here from its conventions (not imported: that code is not a dependency):

- timesteps ``range(0, T, T // n) + 1`` (``make_ddim_timesteps("uniform")``), visited in reverse;
- the schedule's ``alphas_cumprod`` as a float32 buffer; the step after timestep ``t_i`` goes to
  ``alphas_cumprod[t_{i-1}]`` and, after the last one, to ``alphas_cumprod[0]`` (not 1);
- classifier-free guidance on the model output with the batch ``[uncond, cond]``; for v-prediction models
  ``eps = sqrt(a) v + sqrt(1 - a) x`` and ``x0 = sqrt(a) x - sqrt(1 - a) v``;
- ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps``.

Our pipeline loads the file (configs inferred from the shapes, no ldm metadata) and samples with ``ddim``; the same
start noise (image i: ``randn`` from seed + i) and text embeddings go into the reference. diffusers'
``DDIMScheduler`` (swapped in with ``from_config``, as diffusers users do) is run on our diffusers export of the
same model, with the folder's ``set_alpha_to_one`` false and, edited, true.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_sd_single_file import V1_UNET, V2_UNET, _reference, tokenizer_dir  # noqa: F401  (fixture)

from ldm.formats import save_sd_checkpoint
from ldm.formats.clip_keys import transformers_to_openclip
from ldm.pipeline import LatentDiffusionPipeline

PROMPTS = ["a red circle", "a photo of a cat"]
STEPS, GUIDANCE, SEED = 10, 5.0, 11
KW = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, progress=False, output_type="latent",
          height=16, width=16, sampler="ddim")  # fmt: skip
REL_TOL = 1e-5


def _original_ddim(unet, cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, n: int, guidance: float,
                   parameterization: str) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's "linear" schedule
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
    ts = torch.arange(0, 1000, 1000 // n) + 1
    alphas = alphas_cumprod[ts]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]])
    with torch.no_grad():
        for i in reversed(range(len(ts))):
            t = torch.full((2 * x.shape[0],), int(ts[i]), dtype=torch.long)
            out_uncond, out_cond = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
            a, a_prev = alphas[i], alphas_prev[i]
            if parameterization == "v":
                eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
            else:
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _sd_file(tmp_path, tokenizer_dir, version: str):  # noqa: F811
    """A foreign single file (SD keys only, no ldm metadata) of a tiny random model, and the pipeline that loads it."""
    if version == "v1":
        ref = _reference(tokenizer_dir, V1_UNET, "quick_gelu", "last")
        path = save_sd_checkpoint(tmp_path / "v1.safetensors", ref.unet.state_dict(), ref.vae.state_dict(),
                                  ref.text_encoder.model.state_dict())  # fmt: skip
        return LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    ref = _reference(tokenizer_dir, V2_UNET, "gelu", "penultimate")
    clip = transformers_to_openclip(ref.text_encoder.model.state_dict())
    path = save_sd_checkpoint(tmp_path / "v2.safetensors", ref.unet.state_dict(), ref.vae.state_dict(), clip)
    return LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, prediction_type="v_prediction")


def _reference_latents(pipe: LatentDiffusionPipeline) -> torch.Tensor:
    shape = (pipe.vae.latent_channels, 16 // pipe.vae.downsampling_factor, 16 // pipe.vae.downsampling_factor)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(SEED + i)) for i in range(len(PROMPTS))])
    with torch.no_grad():
        cond, uncond = pipe.text_encoder.encode(PROMPTS), pipe.text_encoder.encode([""] * len(PROMPTS))
    parameterization = "v" if pipe.prediction_type == "v_prediction" else "eps"
    return _original_ddim(pipe.unet, cond, uncond, noise, STEPS, GUIDANCE, parameterization)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ddim_from_an_sd_file_matches_the_original_sampler(tmp_path, tokenizer_dir, version):  # noqa: F811
    pipe = _sd_file(tmp_path, tokenizer_dir, version)
    assert pipe.prediction_type == ("v_prediction" if version == "v2" else "epsilon")
    assert not pipe.sampler_config.set_alpha_to_one and pipe.sampler_config.steps_offset == 1
    expected = _reference_latents(pipe)
    ours = pipe(PROMPTS, **KW).images
    assert _relative_error(ours, expected) <= REL_TOL
    # The check has teeth: stepping the last update to alphas_cumprod = 1 instead is off by far more.
    pipe.sampler_config = replace(pipe.sampler_config, set_alpha_to_one=True)
    assert _relative_error(pipe(PROMPTS, **KW).images, expected) > 20 * REL_TOL


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers_ddim_scheduler_with_the_folders_setting(diffusers, tmp_path, tokenizer_dir, version,  # noqa: F811
                                                                        set_alpha_to_one):
    from_file = _sd_file(tmp_path, tokenizer_dir, version)
    folder = from_file.save_pretrained(tmp_path / "diffusers", format="diffusers")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert config["set_alpha_to_one"] is False and config["steps_offset"] == 1  # the SD file's settings travel
    config["set_alpha_to_one"] = set_alpha_to_one
    config_path.write_text(json.dumps(config))

    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    assert reference.scheduler.config.set_alpha_to_one is set_alpha_to_one
    reference.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        expected = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators,
                             output_type="latent", height=16, width=16).images  # fmt: skip

    ours = LatentDiffusionPipeline.from_pretrained(folder)
    assert ours.sampler_config.set_alpha_to_one is set_alpha_to_one
    latents = ours(PROMPTS, **KW).images
    assert _relative_error(latents, expected) <= REL_TOL
    if not set_alpha_to_one:  # the folder of an SD file: diffusers computes what the original sampler does
        assert _relative_error(expected, _reference_latents(from_file)) <= REL_TOL
        assert _relative_error(from_file(PROMPTS, **KW).images, expected) <= REL_TOL
