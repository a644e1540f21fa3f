"""One entry point that runs a named sampler (see :mod:`ldm.diffusion.sampler_registry`) and lays out its
timesteps as diffusers does.

``sample(name, denoiser, noise, schedule, num_steps, ...)`` runs a named sampler from standard-normal noise
(text-to-image) or, with ``start_step > 0``, from ``noise_to_step(...)`` (img2img / inpainting: the first
``start_step`` of ``num_steps`` steps are skipped, as diffusers' pipelines do with ``strength``).
"""

from __future__ import annotations

import torch

from ldm.diffusion.sampler_config import SamplerConfig
from ldm.diffusion.sampler_registry import KARRAS_SAMPLERS, SAMPLERS, SamplerInfo, sampler_info
from ldm.diffusion.samplers import Denoiser, StepCallback
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigmas import dpmsolver_sigmas, euler_sigmas
from ldm.diffusion.timesteps import sampling_timesteps

__all__ = ["KARRAS_SAMPLERS", "SAMPLERS", "noise_to_step", "sample", "sampler_timesteps"]


def _check(name: str, num_steps: int, start_step: int, karras: bool) -> SamplerInfo:
    info = sampler_info(name)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must lie in [0, {num_steps - 1}] for num_steps={num_steps}, got {start_step}")
    if karras and not info.supports_karras:
        raise ValueError(f"Karras sigmas are not supported by sampler {name!r}; they are by {', '.join(KARRAS_SAMPLERS)}")
    return info


def sampler_timesteps(
    name: str, schedule: NoiseSchedule, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The timesteps diffusers' scheduler for sampler ``name`` lays out (before any Karras conversion).

    Raises:
        ValueError: for an unknown sampler name, spacing or ``num_steps`` outside ``[1, T]``.
    """
    convention = _check(name, num_steps, 0, False).convention
    return sampling_timesteps(schedule, num_steps, spacing, steps_offset, convention=convention)


def _timesteps_in_range(name: str, schedule: NoiseSchedule, num_steps: int, config: SamplerConfig) -> torch.Tensor:
    """:func:`sampler_timesteps`, refused when ``steps_offset`` pushes one past the schedule's last timestep (diffusers
    lays such steps out too, then clamps or fails)."""
    timesteps = sampler_timesteps(name, schedule, num_steps, config.timestep_spacing, config.steps_offset)
    last = schedule.num_timesteps - 1
    if float(timesteps.max()) > last:
        raise ValueError(f"steps_offset={config.steps_offset} puts a timestep at {float(timesteps.max()):g}, past the "
                         f"schedule's last ({last}), with {num_steps} steps ({config.timestep_spacing!r} spacing); use "
                         "fewer num_inference_steps, or fix the model's scheduler config (Stable Diffusion's steps_offset is 1)")
    return timesteps


def sample(
    name: str,
    denoiser: Denoiser,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    prediction_type: str = "epsilon",
    config: SamplerConfig = SamplerConfig(),
    karras: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    start_step: int = 0,
) -> torch.Tensor:
    """Run sampler ``name`` (one of :data:`~ldm.diffusion.sampler_registry.SAMPLER_REGISTRY`) for ``num_steps``
    steps and return the denoised sample.

    Args:
        name: ``"ddpm"``, ``"ddim"``, ``"dpmpp_2m"``, ``"euler"``, ``"euler_a"`` or ``"heun"``.
        denoiser: ``denoiser(x_t, t) -> model output``; sigma-space samplers (euler, euler_a, heun) pass float
            timesteps, see :mod:`ldm.diffusion.euler`.
        noise: standard-normal noise when ``start_step == 0``; else ``noise_to_step(...)``'s output.
        schedule: the model's noise schedule.
        num_steps: number of steps of the full schedule (``start_step`` of them are skipped).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (aliases ``"eps"``, ``"v"``).
        config: the model's timestep layout (spacing, ``steps_offset``; laid out as each sampler's diffusers
            scheduler does) and how the last step ends: DDIM to ``alphas_cumprod[0]`` or 1 (``set_alpha_to_one``),
            DPM-Solver++ and Euler to sigma zero or ``sigma_min`` (``final_sigmas_type``), DPM-Solver++'s last step
            first or second order (``lower_order_final``, ``euler_at_final``). DDPM always ends at
            ``alphas_cumprod = 1`` and Euler-ancestral and Heun at sigma zero, as in diffusers.
        karras: Karras sigmas (dpmpp_2m, euler, euler_a, heun only).
        eta: DDIM's noise scale (ddim only; must be 0 for the others).
        generator: noise source of ddpm, euler_a and ddim with ``eta > 0``.
        callback: ``callback(i, t, x)`` after each step.
        start_step: skip this many steps (img2img); ``0 <= start_step < num_steps``.

    Raises:
        ValueError: unknown sampler (the message lists the names), ``num_steps < 1``, ``start_step`` out of range,
            ``karras`` for ddpm/ddim, or ``eta != 0`` for a sampler other than ddim.
    """
    info = _check(name, num_steps, start_step, karras)
    if eta != 0 and not info.takes_eta:
        raise ValueError(f"eta={eta} only applies to the 'ddim' sampler, not {name!r}")
    timesteps = _timesteps_in_range(name, schedule, num_steps, config)
    kwargs: dict = {"callback": callback, "start_step": start_step}
    if info.supports_karras:
        kwargs["use_karras_sigmas"] = karras
    if info.space == "sigma":
        kwargs["spacing"] = config.timestep_spacing
    if info.stochastic or info.takes_eta:
        kwargs["generator"] = generator
    if info.takes_eta:  # DDIM
        final_alpha = 1.0 if config.set_alpha_to_one else float(schedule.alphas_cumprod[0])
        kwargs.update(eta=eta, final_alpha_cumprod=final_alpha)
    if info.takes_final_sigmas_type:
        kwargs["final_sigmas_type"] = config.final_sigmas_type
    if name == "dpmpp_2m":
        kwargs.update(lower_order_final=config.lower_order_final, euler_at_final=config.euler_at_final)
    return info.function(denoiser, noise, schedule, timesteps, prediction_type, **kwargs)


def noise_to_step(
    name: str,
    x0: torch.Tensor,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    start_step: int,
    config: SamplerConfig = SamplerConfig(),
    karras: bool = False,
) -> torch.Tensor:
    """The start sample for ``sample(name, ..., start_step=start_step)``: ``x0`` noised to that step's level.

    This is diffusers' ``scheduler.add_noise(x0, noise, timesteps[start_step])`` (with the pipeline's
    ``set_begin_index``) in VP scale: ``alpha * x0 + sigma * noise``. For ddpm/ddim ``alpha^2 = alphas_cumprod[t]``;
    for dpmpp_2m and the sigma-space samplers the level is the scheduler's sigma at that step (interpolated or
    Karras), with ``alpha = 1 / sqrt(sigma^2 + 1)``; the sigma-space samplers multiply by ``sqrt(sigma^2 + 1)``
    and so start from diffusers' ``x0 + sigma * noise`` exactly.

    Note: with ``start_step == 0``, :func:`sample` takes its input as pure noise and sigma-space samplers scale it
    by diffusers' ``init_noise_sigma`` (= ``sqrt(sigma^2 + 1)`` for leading spacing, ``sigma`` otherwise).

    Raises:
        ValueError: as :func:`sample`.
    """
    convention = _check(name, num_steps, start_step, karras).convention
    timesteps = _timesteps_in_range(name, schedule, num_steps, config)
    if convention == "ddim":
        t = torch.full((x0.shape[0],), int(timesteps[start_step]), dtype=torch.long)
        return schedule.add_noise(x0, noise, t)
    if convention == "dpmsolver":
        sigma = dpmsolver_sigmas(schedule, timesteps, karras)[1][start_step]
    else:
        sigma = euler_sigmas(schedule, timesteps, karras)[1][start_step]
    alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
    work = torch.promote_types(x0.dtype, torch.float32)
    return (alpha * x0.to(work) + sigma * alpha * noise.to(work)).to(x0.dtype)
