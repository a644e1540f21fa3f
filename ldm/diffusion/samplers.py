"""Samplers as plain functions of a denoiser over a discrete VP schedule.

A *denoiser* is ``denoiser(x_t, t) -> model_output``: ``x_t`` the current sample, ``t`` a LongTensor of
shape (B,) of training timesteps, and the raw network output for the sampler's ``prediction_type``.
Guidance, conditioning and input scaling live inside the denoiser (a closure), not here.

The update arithmetic runs in at least float32 (as diffusers does) and the sample keeps the input dtype.
Step coefficients come from the float64 schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ldm.diffusion.parameterization import eps_from_output, normalize_prediction_type, x0_from_output
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.timesteps import sampling_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]

__all__ = ["Denoiser", "SAMPLERS", "sample_ddim", "sample_dpmpp_2m", "sampling_timesteps"]

# diffusers' floor for alphas_cumprod[-1] under zero terminal SNR in its DPM-Solver (keeps log-SNR finite).
_DPM_MIN_ALPHA_CUMPROD = 2.0**-24


def _as_int_list(timesteps: torch.Tensor | Sequence[int]) -> list[int]:
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    return ts


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


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
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from ``x = x_T`` along descending ``timesteps``; returns the final sample.

    Each step goes from ``timesteps[i]`` to ``timesteps[i + 1]``; the last step goes to a virtual step with
    ``alphas_cumprod = final_alpha_cumprod`` (1.0: diffusers' ``set_alpha_to_one=True``). ``eta`` scales the
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
    ac = schedule.alphas_cumprod
    out_dtype, work = x.dtype, _work_dtype(x)
    for i, t in enumerate(ts):
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
            device = generator.device if generator is not None else x.device
            noise = torch.randn(raw.shape, generator=generator, device=device, dtype=raw.dtype)
            xw = xw + std * noise.to(device=x.device, dtype=work)
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
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data prediction, midpoint form.

    Matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", final_sigmas_type="zero")``: steps run in log-SNR ``lambda = log(alpha/sigma)``
    along ``timesteps`` and then to sigma = 0. The first step is first order (no history yet); the last
    step, into sigma = 0, is first order too, which there simply returns the current x0 estimate (the
    second-order correction is undefined at lambda = +inf). diffusers takes that first-order final step
    whatever ``lower_order_final`` says when the final sigma is zero, so the flag is accepted for parity and
    has no effect here. For diffusers-identical timesteps use
    ``sampling_timesteps(..., convention="dpmsolver")``.

    Under zero terminal SNR, ``alphas_cumprod == 0`` is floored at 2**-24 as diffusers does.
    ``callback(i, t, x)`` is called after each step with the new sample.
    """
    del lower_order_final  # see docstring: no effect with a zero final sigma and order 2
    prediction_type = normalize_prediction_type(prediction_type)
    ts = _as_int_list(timesteps)
    ac = schedule.alphas_cumprod
    ac = torch.where(ac > 0, ac, torch.full_like(ac, _DPM_MIN_ALPHA_CUMPROD))
    alphas = [math.sqrt(float(ac[t])) for t in ts]
    sigmas = [math.sqrt(1.0 - float(ac[t])) for t in ts]
    lambdas = [math.log(a) - math.log(s) for a, s in zip(alphas, sigmas)]
    out_dtype, work = x.dtype, _work_dtype(x)
    prev_x0: torch.Tensor | None = None
    for i, t in enumerate(ts):
        output = _call(denoiser, x, t).to(work)
        xw = x.to(work)
        x0 = x0_from_output(prediction_type, output, xw, alphas[i], sigmas[i])
        if i + 1 == len(ts):
            xw = x0  # first-order step to sigma = 0: sigma_next/sigma * x -> 0, alpha_next * (1 - e^-h) -> 1
        else:
            h = lambdas[i + 1] - lambdas[i]
            ratio = sigmas[i + 1] / sigmas[i]
            coef = -alphas[i + 1] * math.expm1(-h)  # alpha_next * (1 - e^-h)
            if prev_x0 is None:
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


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}
