"""Samplers as plain functions of a denoiser over a discrete VP schedule.

A *denoiser* is ``denoiser(x_t, t) -> model_output``: ``x_t`` the current sample, ``t`` a LongTensor of
shape (B,) of training timesteps, and the raw network output for the sampler's ``prediction_type``.
Guidance and conditioning live inside the denoiser (a closure), not here. (The sigma-space samplers of
:mod:`ldm.diffusion.euler` pass float timesteps; see there.)

All samplers take ``start_step`` (keyword): skip the first ``start_step`` steps of ``timesteps``, with ``x``
then the sample noised to ``timesteps[start_step]`` (img2img; see :func:`ldm.diffusion.sampling.noise_to_step`).

The update arithmetic runs in at least float32 (as diffusers does) and the sample keeps the input dtype.
Step coefficients come from the float64 schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ldm.diffusion.parameterization import eps_from_output, normalize_prediction_type, x0_from_output
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigmas import dpmsolver_sigmas, final_sigma
from ldm.diffusion.timesteps import sampling_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]

__all__ = ["Denoiser", "StepCallback", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sampling_timesteps"]


def _as_int_list(timesteps: torch.Tensor | Sequence[int]) -> list[int]:
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    return ts


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_start(start_step: int, n: int) -> None:
    if not 0 <= start_step < n:
        raise ValueError(f"start_step must lie in [0, {n - 1}] for {n} timesteps, got {start_step}")


def _randn_like_output(raw: torch.Tensor, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One ``torch.randn`` of the model output's shape and dtype, on the generator's device (as diffusers draws)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(raw.shape, generator=generator, device=gen_device, dtype=raw.dtype).to(device)


def _call(denoiser: Denoiser, x: torch.Tensor, t: int) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    final_alpha_cumprod: float = 1.0,
    *,
    start_step: int = 0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from ``x = x_T`` along descending ``timesteps``; returns the final sample.

    Each step goes from ``timesteps[i]`` to ``timesteps[i + 1]``; the last step goes to a virtual step with
    ``alphas_cumprod = final_alpha_cumprod``: 1.0 is diffusers' ``set_alpha_to_one=True``; ``alphas_cumprod[0]`` is
    ``set_alpha_to_one=False`` and what the original CompVis/Stability ``DDIMSampler`` does (Stable Diffusion's
    setting; :func:`ldm.diffusion.sampling.sample` picks it from the model's ``SamplerConfig``). ``eta`` scales the
    per-step noise (0: deterministic, 1: DDPM-like). With ``eta > 0`` one ``torch.randn`` of the sample's
    shape and dtype is drawn per step (also on the last, zero-variance step) from ``generator``, on the
    generator's device, as diffusers' ``DDIMScheduler.step`` does, so the same seeded generator gives the same
    result. No clipping or thresholding of the x0 estimate.

    Note: diffusers' DDIM steps to ``t - T // num_steps`` rather than to the next listed timestep; the two
    agree for ``leading`` spacing and for ``trailing`` when ``num_steps`` divides T.

    ``callback(i, t, x)`` is called after each step with the new sample.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    ts = _as_int_list(timesteps)
    _check_start(start_step, len(ts))
    ac = schedule.alphas_cumprod
    out_dtype, work = x.dtype, _work_dtype(x)
    for i in range(start_step, len(ts)):
        t = ts[i]
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else float(final_alpha_cumprod)
        alpha, sigma = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        raw = _call(denoiser, x, t)
        output, xw = raw.to(work), x.to(work)
        x0 = x0_from_output(prediction_type, output, xw, alpha, sigma)
        eps = eps_from_output(prediction_type, output, xw, alpha, sigma)
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * math.sqrt(max(variance, 0.0))
        xw = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - std**2, 0.0)) * eps
        if eta > 0:
            xw = xw + std * _randn_like_output(raw, generator, x.device).to(work)
        x = xw.to(out_dtype)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    prediction_type: str = "epsilon",
    callback: StepCallback | None = None,
    lower_order_final: bool = True,
    *,
    use_karras_sigmas: bool = False,
    start_step: int = 0,
    final_sigmas_type: str = "zero",
    euler_at_final: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data prediction, midpoint form.

    Matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint")`` with the same ``final_sigmas_type``, ``lower_order_final`` and ``euler_at_final``:
    steps run in log-SNR ``lambda = log(alpha/sigma)`` along ``timesteps`` and then to the final sigma, zero or the
    schedule's ``sigma_min`` (:func:`ldm.diffusion.sigmas.final_sigma`). The first step is first order (no history
    yet). The last step is first order when it goes to zero (where it simply returns the current x0 estimate: the
    second-order correction is undefined at lambda = +inf), with ``euler_at_final``, or with ``lower_order_final``
    and fewer than 15 timesteps; otherwise it is second order. For diffusers-identical timesteps use
    ``sampling_timesteps(..., convention="dpmsolver")``.

    ``use_karras_sigmas`` (diffusers' ``use_karras_sigmas=True``): step through Karras et al. noise levels over the
    whole training range instead; then only ``len(timesteps)`` matters, and the model sees the rounded timesteps
    of those levels (:func:`ldm.diffusion.sigmas.dpmsolver_sigmas`).

    Under zero terminal SNR, ``alphas_cumprod == 0`` is floored at 2**-24 as diffusers does.
    ``callback(i, t, x)`` is called after each step with the new sample.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    ts = _as_int_list(timesteps)
    _check_start(start_step, len(ts))
    ts, ks = dpmsolver_sigmas(schedule, ts, use_karras_sigmas)  # ks: sigma-space levels sqrt((1 - ac) / ac)
    last = final_sigma(schedule, final_sigmas_type)
    first_order_final = last == 0.0 or euler_at_final or (lower_order_final and len(ts) < 15)
    ks = ks + [last]
    alphas = [1.0 / math.sqrt(k * k + 1.0) for k in ks]
    sigmas = [k * a for k, a in zip(ks, alphas)]
    lambdas = [-math.log(k) if k > 0 else math.inf for k in ks]  # log(alpha / sigma)
    out_dtype, work = x.dtype, _work_dtype(x)
    prev_x0: torch.Tensor | None = None
    for i in range(start_step, len(ts)):
        t = ts[i]
        output = _call(denoiser, x, t).to(work)
        xw = x.to(work)
        x0 = x0_from_output(prediction_type, output, xw, alphas[i], sigmas[i])
        h = lambdas[i + 1] - lambdas[i]
        if ks[i + 1] == 0.0:
            xw = x0  # first-order step to sigma = 0: sigma_next/sigma * x -> 0, alpha_next * (1 - e^-h) -> 1
        elif h != 0.0:  # h == 0 (a Karras schedule ending in sigma_min, then sigma_min again): the step is the identity
            ratio = sigmas[i + 1] / sigmas[i]
            coef = -alphas[i + 1] * math.expm1(-h)  # alpha_next * (1 - e^-h)
            if prev_x0 is None or (i + 1 == len(ts) and first_order_final):
                xw = ratio * xw + coef * x0
            else:
                r = (lambdas[i] - lambdas[i - 1]) / h
                d = x0 + (0.5 / r) * (x0 - prev_x0)
                xw = ratio * xw + coef * d
        prev_x0 = x0
        x = xw.to(out_dtype)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    *,
    start_step: int = 0,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020) from ``x = x_T`` along descending ``timesteps``; returns the final sample.

    Matches diffusers' ``DDPMScheduler(variance_type="fixed_small", clip_sample=False)``: each step draws
    ``x_prev ~ N(mu(x_t, x0_hat), beta_tilde)`` with the posterior variance ``(1 - a_prev) / (1 - a_t) * beta``
    (floored at 1e-20) for the step ``timesteps[i] -> timesteps[i + 1]`` (``beta = 1 - a_t / a_prev``), and the last
    step goes to ``alphas_cumprod = 1``. Noise: one ``torch.randn`` of the model output's shape and dtype per step
    whose timestep is > 0, from ``generator`` on its device, in diffusers' order. For diffusers' timesteps use
    ``sampling_timesteps(..., convention="ddim")``. ``callback(i, t, x)`` is called after each step.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    ts = _as_int_list(timesteps)
    _check_start(start_step, len(ts))
    ac = schedule.alphas_cumprod
    out_dtype, work = x.dtype, _work_dtype(x)
    for i in range(start_step, len(ts)):
        t = ts[i]
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        step_alpha = a_t / a_prev
        step_beta = 1.0 - step_alpha
        raw = _call(denoiser, x, t)
        output, xw = raw.to(work), x.to(work)
        x0 = x0_from_output(prediction_type, output, xw, math.sqrt(a_t), math.sqrt(1.0 - a_t))
        x0_coef = math.sqrt(a_prev) * step_beta / (1.0 - a_t)
        xt_coef = math.sqrt(step_alpha) * (1.0 - a_prev) / (1.0 - a_t)
        xw = x0_coef * x0 + xt_coef * xw
        if t > 0:
            variance = max((1.0 - a_prev) / (1.0 - a_t) * step_beta, 1e-20)
            xw = xw + math.sqrt(variance) * _randn_like_output(raw, generator, x.device).to(work)
        x = xw.to(out_dtype)
        if callback is not None:
            callback(i, t, x)
    return x
