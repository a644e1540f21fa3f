"""Sigma-space samplers (Karras et al. 2022; k-diffusion): Euler, Euler-ancestral and Heun.

They match diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and ``HeunDiscreteScheduler``
given the same model function, timesteps and noise, with the same calling convention as the VP samplers:

- ``x`` is standard-normal noise (or, with ``start_step > 0``, the VP sample noised to the start step, see
  :func:`ldm.diffusion.sampling.noise_to_step`). Internally the samplers integrate ``x_sigma = x0 + sigma * eps``;
  the initial noise is scaled by diffusers' ``init_noise_sigma`` (which depends on ``spacing``, see
  :func:`ldm.diffusion.sigmas.init_noise_sigma`), a noised start sample by ``sqrt(sigma^2 + 1)``.
- The denoiser sees the VP-scaled sample ``x_sigma / sqrt(sigma^2 + 1)`` and the timestep as diffusers passes it:
  a **float32** tensor of shape (B,), fractional for ``linspace`` spacing and Karras sigmas (interpolated
  timesteps). The denoiser must accept float timesteps (``ldm.nn`` UNets do).
- ``timesteps`` are the scheduler's layout, ``sampling_timesteps(..., convention="euler")``; sigmas are interpolated
  at them and end in 0 (:func:`ldm.diffusion.sigmas.euler_sigmas`), or for :func:`sample_euler` with
  ``final_sigmas_type="sigma_min"`` in the schedule's smallest sigma (diffusers' Euler-ancestral and Heun schedulers
  always end in 0).
- ``callback(i, t, x)`` gets the step index, the float timestep and the new sample in VP scale. The returned sample
  is the last one in sigma space, as diffusers returns it: ``x0 + sigma * eps`` at the final sigma (so, at 0, the
  denoised sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm.diffusion.parameterization import normalize_prediction_type
from ldm.diffusion.samplers import Denoiser, StepCallback, _randn_like_output, _work_dtype
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigmas import euler_sigmas, init_noise_sigma

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun"]


def _setup(
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[float],
    use_karras_sigmas: bool,
    spacing: str,
    start_step: int,
    final_sigmas_type: str = "zero",
) -> tuple[list[float], list[float], torch.Tensor]:
    ts_in = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
    if ts_in.numel() == 0:
        raise ValueError("timesteps is empty")
    if not 0 <= start_step < ts_in.numel():
        raise ValueError(f"start_step must lie in [0, {ts_in.numel() - 1}] for {ts_in.numel()} timesteps, got {start_step}")
    ts, sigmas = euler_sigmas(schedule, ts_in, use_karras_sigmas, final_sigmas_type)
    if start_step == 0:
        scale = init_noise_sigma(max(sigmas), spacing)
    else:
        scale = math.sqrt(sigmas[start_step] ** 2 + 1.0)
    return ts, sigmas, x.to(_work_dtype(x)) * scale


def _model(denoiser: Denoiser, xs: torch.Tensor, sigma: float, t: float, out_dtype: torch.dtype) -> torch.Tensor:
    x_in = (xs / math.sqrt(sigma * sigma + 1.0)).to(out_dtype)
    return denoiser(x_in, torch.full((xs.shape[0],), t, dtype=torch.float32, device=xs.device))


def _denoised(prediction_type: str, output: torch.Tensor, xs: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 estimate from a model output at sigma-space sample ``xs``."""
    if prediction_type == "epsilon":
        return xs - sigma * output
    # v = alpha * eps - sigma_vp * x0 with alpha = 1/sqrt(s^2+1), sigma_vp = s * alpha and x_vp = alpha * xs
    return output * (-sigma / math.sqrt(sigma * sigma + 1.0)) + xs / (sigma * sigma + 1.0)


def _report(callback: StepCallback | None, i: int, t: float, xs: torch.Tensor, sigma: float, dtype: torch.dtype) -> None:
    if callback is not None:
        callback(i, t, (xs / math.sqrt(sigma * sigma + 1.0)).to(dtype))


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[float],
    prediction_type: str = "epsilon",
    callback: StepCallback | None = None,
    *,
    use_karras_sigmas: bool = False,
    spacing: str = "leading",
    start_step: int = 0,
    final_sigmas_type: str = "zero",
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE, ``dx/dsigma = (x - x0_hat) / sigma`` (diffusers'
    ``EulerDiscreteScheduler`` with ``s_churn=0``).

    ``spacing`` is the spacing ``timesteps`` were laid out with; it only picks diffusers' initial noise scale.
    ``final_sigmas_type``: the last step goes to sigma ``"zero"`` or to the schedule's ``"sigma_min"``.
    ``use_karras_sigmas``: Karras levels between the first and last interpolated sigma (diffusers'
    ``use_karras_sigmas=True``). See the module docstring for the conventions.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    ts, sigmas, xs = _setup(x, schedule, timesteps, use_karras_sigmas, spacing, start_step, final_sigmas_type)
    out_dtype, work = x.dtype, xs.dtype
    for i in range(start_step, len(ts)):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _denoised(prediction_type, _model(denoiser, xs, s, ts[i], out_dtype).to(work), xs, s)
        xs = xs + (xs - x0) / s * (s_next - s)
        _report(callback, i, ts[i], xs, s_next, out_dtype)
    return xs.to(out_dtype)


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[float],
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    *,
    use_karras_sigmas: bool = False,
    spacing: str = "leading",
    start_step: int = 0,
) -> torch.Tensor:
    """Ancestral Euler ("Euler a"): an Euler step down to ``sigma_down`` and fresh noise up to ``sigma_next``, with
    ``sigma_up = sqrt(s_next^2 (s^2 - s_next^2) / s^2)`` and ``sigma_down = sqrt(s_next^2 - sigma_up^2)``
    (diffusers' ``EulerAncestralDiscreteScheduler``, eta = 1).

    Noise: one ``torch.randn`` of the model output's shape and dtype per step (the last, noiseless one included),
    from ``generator`` on its device, as diffusers draws. ``use_karras_sigmas`` uses the Karras levels of
    :func:`sample_euler` (diffusers' Euler-ancestral scheduler has no such option; k-diffusion's "Euler a Karras").
    """
    prediction_type = normalize_prediction_type(prediction_type)
    ts, sigmas, xs = _setup(x, schedule, timesteps, use_karras_sigmas, spacing, start_step)
    out_dtype, work = x.dtype, xs.dtype
    for i in range(start_step, len(ts)):
        s, s_next = sigmas[i], sigmas[i + 1]
        raw = _model(denoiser, xs, s, ts[i], out_dtype)
        x0 = _denoised(prediction_type, raw.to(work), xs, s)
        sigma_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        sigma_down = math.sqrt(max(s_next**2 - sigma_up**2, 0.0))
        xs = xs + (xs - x0) / s * (sigma_down - s)
        xs = xs + _randn_like_output(raw, generator, xs.device).to(work) * sigma_up
        _report(callback, i, ts[i], xs, s_next, out_dtype)
    return xs.to(out_dtype)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[float],
    prediction_type: str = "epsilon",
    callback: StepCallback | None = None,
    *,
    use_karras_sigmas: bool = False,
    spacing: str = "leading",
    start_step: int = 0,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn; diffusers'
    ``HeunDiscreteScheduler``): an Euler predictor to ``sigma_next``, a second model call there and the averaged
    slope; the last step, into sigma = 0, is a plain Euler step. ``2 * len(timesteps) - 1`` model calls in all.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    ts, sigmas, xs = _setup(x, schedule, timesteps, use_karras_sigmas, spacing, start_step)
    out_dtype, work = x.dtype, xs.dtype
    for i in range(start_step, len(ts)):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _denoised(prediction_type, _model(denoiser, xs, s, ts[i], out_dtype).to(work), xs, s)
        d = (xs - x0) / s
        if s_next == 0:
            xs = xs + d * (s_next - s)
        else:
            x_pred = xs + d * (s_next - s)
            out2 = _model(denoiser, x_pred, s_next, ts[i + 1], out_dtype).to(work)
            d2 = (x_pred - _denoised(prediction_type, out2, x_pred, s_next)) / s_next
            xs = xs + (d + d2) / 2 * (s_next - s)
        _report(callback, i, ts[i], xs, s_next, out_dtype)
    return xs.to(out_dtype)
