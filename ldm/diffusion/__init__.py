"""Diffusion math: noise schedules, parameterisations, loss weighting, guidance and samplers (plain torch)."""

from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.loss_weighting import LOSS_WEIGHTINGS, loss_weights, offset_noise
from ldm.diffusion.parameterization import (
    PREDICTION_TYPES,
    eps_from_output,
    normalize_prediction_type,
    training_target,
    v_from_x0_eps,
    x0_from_output,
)
from ldm.diffusion.samplers import SAMPLERS, Denoiser, sample_ddim, sample_dpmpp_2m
from ldm.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_zero_terminal_snr
from ldm.diffusion.timesteps import TIMESTEP_CONVENTIONS, TIMESTEP_SPACINGS, sampling_timesteps

__all__ = [
    "BETA_SCHEDULES",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TIMESTEP_CONVENTIONS",
    "TIMESTEP_SPACINGS",
    "Denoiser",
    "NoiseSchedule",
    "classifier_free_guidance",
    "eps_from_output",
    "loss_weights",
    "make_betas",
    "normalize_prediction_type",
    "offset_noise",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sampling_timesteps",
    "training_target",
    "v_from_x0_eps",
    "x0_from_output",
]
