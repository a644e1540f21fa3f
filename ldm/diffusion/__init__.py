"""Diffusion math: noise schedules, parameterisations, loss weighting, guidance and samplers (plain torch)."""

from ldm.diffusion.guidance import caption_drop_mask, classifier_free_guidance, drop_captions
from ldm.diffusion.guided import guided_denoiser, sample_latents
from ldm.diffusion.loss_weighting import LOSS_WEIGHTINGS, loss_weights, offset_noise
from ldm.diffusion.parameterization import (
    PREDICTION_TYPES,
    eps_from_output,
    normalize_prediction_type,
    training_target,
    v_from_x0_eps,
    x0_from_output,
)
from ldm.diffusion.euler import sample_euler, sample_euler_ancestral, sample_heun
from ldm.diffusion.sampler_config import FINAL_SIGMAS_TYPES, SamplerConfig
from ldm.diffusion.sampler_registry import SAMPLER_REGISTRY, SamplerInfo, sampler_info
from ldm.diffusion.samplers import Denoiser, sample_ddim, sample_ddpm, sample_dpmpp_2m
from ldm.diffusion.sampling import KARRAS_SAMPLERS, SAMPLERS, noise_to_step, sample, sampler_timesteps
from ldm.diffusion.sigmas import karras_sigmas
from ldm.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_zero_terminal_snr
from ldm.diffusion.timesteps import TIMESTEP_CONVENTIONS, TIMESTEP_SPACINGS, sampling_timesteps

__all__ = [
    "BETA_SCHEDULES",
    "FINAL_SIGMAS_TYPES",
    "KARRAS_SAMPLERS",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SAMPLER_REGISTRY",
    "TIMESTEP_CONVENTIONS",
    "TIMESTEP_SPACINGS",
    "Denoiser",
    "NoiseSchedule",
    "SamplerConfig",
    "SamplerInfo",
    "classifier_free_guidance",
    "caption_drop_mask",
    "drop_captions",
    "eps_from_output",
    "guided_denoiser",
    "karras_sigmas",
    "loss_weights",
    "make_betas",
    "noise_to_step",
    "normalize_prediction_type",
    "offset_noise",
    "rescale_zero_terminal_snr",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_latents",
    "sampler_info",
    "sampler_timesteps",
    "sampling_timesteps",
    "training_target",
    "v_from_x0_eps",
    "x0_from_output",
]
