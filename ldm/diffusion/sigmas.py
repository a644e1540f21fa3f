"""Noise levels in sigma space (``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``), as diffusers lays them out.

Sigma-space ("k-diffusion") samplers work on ``x = x0 + sigma * eps``, which is the VP sample ``x_t = alpha_t * x0 +
sigma_t * eps`` times ``sqrt(sigma^2 + 1)`` (``alpha_t = 1 / sqrt(sigma^2 + 1)``). Everything here is float64 on the
CPU; samplers turn the values into Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm.diffusion.schedule import NoiseSchedule

# diffusers floors alphas_cumprod[-1] == 0 (zero terminal SNR) at this value so the largest sigma stays finite.
MIN_ALPHA_CUMPROD = 2.0**-24


def schedule_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """Sigma of every training timestep, shape (T,), ascending in t; ``alphas_cumprod == 0`` floored at 2**-24."""
    ac = schedule.alphas_cumprod
    ac = torch.where(ac > 0, ac, torch.full_like(ac, MIN_ALPHA_CUMPROD))
    return ((1.0 - ac) / ac).sqrt()


def interpolate_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Sigma at (possibly fractional) timesteps, linearly interpolated between training timesteps (``np.interp``)."""
    sig = schedule_sigmas(schedule)
    t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().clamp(0, schedule.num_timesteps - 1)
    if schedule.num_timesteps == 1:
        return sig[t.long()]
    lo = t.floor().long().clamp(max=schedule.num_timesteps - 2)
    w = t - lo.double()
    return sig[lo] * (1.0 - w) + sig[lo + 1] * w


def sigma_to_timestep(schedule: NoiseSchedule, sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Fractional timesteps of the given sigmas: linear interpolation in log-sigma (diffusers' ``_sigma_to_t``)."""
    log_sigmas = schedule_sigmas(schedule).log()
    log_sigma = torch.as_tensor(sigmas, dtype=torch.float64).clamp(min=1e-10).log()
    n = log_sigmas.numel()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, max(n - 2, 0))
    high = (low + 1).clamp(max=n - 1)
    lo_v, hi_v = log_sigmas[low], log_sigmas[high]
    w = ((lo_v - log_sigma) / (lo_v - hi_v)).nan_to_num(0.0).clamp(0, 1)
    return (1 - w) * low.double() + w * high.double()


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels: ``num_steps`` values from ``sigma_max`` down to ``sigma_min`` (no final 0)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def final_sigma(schedule: NoiseSchedule, final_sigmas_type: str = "zero") -> float:
    """Where a sampler's last step ends (diffusers' ``final_sigmas_type``): ``"zero"``, or ``"sigma_min"``, the
    smallest noise level of the schedule, ``sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])``."""
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        return float(schedule_sigmas(schedule)[0])
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")


def euler_sigmas(
    schedule: NoiseSchedule, timesteps: torch.Tensor | Sequence[float], use_karras_sigmas: bool = False,
    final_sigmas_type: str = "zero",
) -> tuple[list[float], list[float]]:
    """``(timesteps, sigmas)`` of diffusers' Euler / Euler-ancestral / Heun schedulers (before Heun's doubling).

    ``sigmas`` are interpolated at ``timesteps`` and end with an appended final sigma, 0 or the schedule's
    smallest (:func:`final_sigma`; one more than the timesteps). With
    ``use_karras_sigmas`` the sigmas are replaced by ``len(timesteps)`` Karras levels between the first and last
    interpolated sigma, and the timesteps by their (fractional) log-sigma positions.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
    sig = interpolate_sigmas(schedule, ts)
    if use_karras_sigmas:
        sig = karras_sigmas(float(sig[-1]), float(sig[0]), ts.numel())
        ts = sigma_to_timestep(schedule, sig)
    return ts.tolist(), sig.tolist() + [final_sigma(schedule, final_sigmas_type)]


def dpmsolver_sigmas(
    schedule: NoiseSchedule, timesteps: torch.Tensor | Sequence[int], use_karras_sigmas: bool = False
) -> tuple[list[int], list[float]]:
    """``(timesteps, sigmas)`` of diffusers' DPMSolverMultistepScheduler (``final_sigmas_type="zero"``, no final 0).

    Without Karras sigmas these are the given integer timesteps and their sigmas. With ``use_karras_sigmas`` only
    ``len(timesteps)`` is used: Karras levels span the whole training range and the timesteps are their rounded
    log-sigma positions (diffusers does not round for the cosine schedule).
    """
    ts = [int(t) for t in torch.as_tensor(timesteps).tolist()]
    sig_all = schedule_sigmas(schedule)
    if not use_karras_sigmas:
        return ts, [float(sig_all[t]) for t in ts]
    sig = karras_sigmas(float(sig_all[0]), float(sig_all[-1]), len(ts))
    t_frac = sigma_to_timestep(schedule, sig)
    if schedule.kind != "cosine":
        t_frac = t_frac.round()
    return [int(t) for t in t_frac.long().tolist()], sig.tolist()


def init_noise_sigma(sigma_max: float, spacing: str) -> float:
    """diffusers' ``init_noise_sigma`` of its Euler-family schedulers: ``sigma_max`` for linspace/trailing spacing,
    ``sqrt(sigma_max^2 + 1)`` (the exact VP-to-sigma scale) for leading."""
    return float(sigma_max) if spacing in ("linspace", "trailing") else math.sqrt(float(sigma_max) ** 2 + 1.0)
