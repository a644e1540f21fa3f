"""Which training timesteps a sampler visits, computed exactly as diffusers' schedulers do."""

from __future__ import annotations

import numpy as np
import torch

from ldm.diffusion.schedule import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
TIMESTEP_CONVENTIONS = ("ddim", "dpmsolver", "euler")


def sampling_timesteps(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    convention: str = "ddim",
) -> torch.Tensor:
    """Descending timesteps for ``num_steps`` sampling steps (Lin et al. 2023, Table 2 spacings).

    diffusers uses three conventions, chosen with ``convention``:

    - ``"ddim"`` (DDIMScheduler, DDPMScheduler, PNDMScheduler), int64: ``linspace`` spreads ``num_steps``
      points over ``[0, T-1]`` (so it ends at 0); ``leading`` is ``arange(num_steps) * (T // num_steps)
      + steps_offset``; ``trailing`` is ``round(arange(T, 0, -T / num_steps)) - 1``.
    - ``"dpmsolver"`` (DPMSolverMultistepScheduler, UniPC): ``linspace`` and ``leading`` lay out
      ``num_steps + 1`` points and drop the 0, because the solver's last step goes to sigma = 0 on its
      own; ``trailing`` is as above.
    - ``"euler"`` (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler), float32: as
      ``"ddim"`` but ``linspace`` is not rounded, so its timesteps can be fractional (e.g. 957.375 for 25 steps).

    ``steps_offset`` (1 in Stable Diffusion's configs) only affects ``leading``, as in diffusers.

    Raises:
        ValueError: for ``num_steps`` outside ``[1, T]``, an unknown spacing or convention.
    """
    T = schedule.num_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in [1, {T}] (the schedule's training timesteps), got {num_steps}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    if convention not in TIMESTEP_CONVENTIONS:
        raise ValueError(f"Unknown timestep convention {convention!r}; choose one of {', '.join(TIMESTEP_CONVENTIONS)}")

    ts = _timesteps(T, num_steps, spacing, steps_offset, convention)
    if not _strictly_decreasing(ts):  # near T, rounding makes some spacings repeat steps
        fewer = next(n for n in range(num_steps - 1, 0, -1)
                     if _strictly_decreasing(_timesteps(T, n, spacing, steps_offset, convention)))
        raise ValueError(f"{num_steps} sampling steps (num_inference_steps) repeat timesteps with {spacing!r} spacing "
                         f"for this sampler ({convention} layout of {T} training timesteps); use at most {fewer}")
    return ts


def _strictly_decreasing(ts: torch.Tensor) -> bool:
    return bool((ts[1:] < ts[:-1]).all())


def _timesteps(T: int, num_steps: int, spacing: str, steps_offset: int, convention: str) -> torch.Tensor:
    if convention == "euler":
        return _euler_timesteps(T, num_steps, spacing, steps_offset)
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    elif convention == "ddim":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        else:
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    else:
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        else:
            ratio = T // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    return torch.from_numpy(ts.copy())


def _euler_timesteps(T: int, num_steps: int, spacing: str, steps_offset: int) -> torch.Tensor:
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.float32) + steps_offset
    else:
        ts = np.arange(T, 0, -T / num_steps).round().astype(np.float32) - 1
    return torch.from_numpy(ts.astype(np.float32).copy())
