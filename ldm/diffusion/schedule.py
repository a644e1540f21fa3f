"""Discrete variance-preserving noise schedules (betas, cumulative alphas) and the forward process.

The schedule is kept in float64 on the CPU; tensors handed to models are cast to the caller's
dtype and device. Conventions follow DDPM / Stable Diffusion: ``x_t = alpha_t * x0 + sigma_t * eps``
with ``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")

# Our schedule names -> diffusers' ``beta_schedule`` names.
_DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def make_betas(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    cosine_s: float = 0.008,
) -> torch.Tensor:
    """Return the float64 betas of a named schedule.

    Args:
        kind: ``"linear"`` (betas linearly spaced from ``beta_start`` to ``beta_end``),
            ``"scaled_linear"`` (Stable Diffusion: square roots linearly spaced, then squared) or
            ``"cosine"`` (Nichol & Dhariwal 2021, diffusers' ``squaredcos_cap_v2``; betas clipped at 0.999;
            ``beta_start``/``beta_end`` are ignored).
        num_timesteps: number of training timesteps T.
        beta_start: first beta (linear kinds).
        beta_end: last beta (linear kinds).
        cosine_s: offset ``s`` of the cosine schedule.

    Raises:
        ValueError: on an unknown ``kind`` or ``num_timesteps < 1``.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":

        def alpha_bar(u: float) -> float:
            return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

        betas = [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"Unknown beta schedule kind {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    ``sqrt(alphas_cumprod)`` is shifted so its last value is 0 and scaled so its first value is kept;
    the betas are recovered from the result. The returned last beta is exactly 1.
    """
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sqrt_ac = alphas_cumprod.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A discrete VP noise schedule: betas and cumulative alphas (float64, CPU) plus helpers.

    Args:
        kind: beta schedule name, see :func:`make_betas`.
        num_timesteps: number of training timesteps T.
        beta_start: first beta (linear kinds).
        beta_end: last beta (linear kinds).
        zero_terminal_snr: rescale betas so ``alphas_cumprod[-1] == 0`` (use with v-prediction).
    """

    def __init__(
        self,
        kind: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> None:
        self.kind = kind
        self.num_timesteps = int(num_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        betas = make_betas(kind, self.num_timesteps, self.beta_start, self.beta_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas: torch.Tensor = betas
        self.alphas_cumprod: torch.Tensor = torch.cumprod(1.0 - betas, dim=0)
        if self.zero_terminal_snr:
            self.alphas_cumprod[-1] = 0.0  # exact, not a rounding residue

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items())
        return f"NoiseSchedule({args})"

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).long().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise IndexError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.tolist()}")
        return self.alphas_cumprod[t.reshape(-1)]

    def alpha_sigma(
        self,
        t: torch.Tensor,
        ndim: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fractional: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` for integer timesteps ``t`` of shape (B,), each shaped (B, 1, ..., 1).

        ``ndim`` is the rank of the tensors they will multiply; ``device`` defaults to ``t``'s device.
        ``fractional``: ``t`` may be fractional (the float timesteps that sigma-space samplers hand the denoiser):
        ``alphas_cumprod`` is interpolated linearly between the integer timesteps around ``t``, with ``t`` clamped
        to ``[0, T - 1]``, on ``device``; without it, a timestep outside ``[0, T - 1]`` raises ``IndexError``.
        """
        t = torch.as_tensor(t)
        device = t.device if device is None else device
        if fractional:
            table = self.alphas_cumprod.to(device)
            tf = t.to(device, torch.float64).clamp(0, len(table) - 1)
            lo = tf.floor().long()
            hi = (lo + 1).clamp(max=len(table) - 1)
            ac = table[lo] + (table[hi] - table[lo]) * (tf - lo)
        else:
            ac = self._gather(t)
        shape = (-1,) + (1,) * (ndim - 1)
        alpha = ac.sqrt().view(shape).to(device=device, dtype=dtype)
        sigma = (1.0 - ac).sqrt().view(shape).to(device=device, dtype=dtype)
        return alpha, sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process: ``alpha_t * x0 + sigma_t * noise``."""
        alpha, sigma = self.alpha_sigma(t, ndim=x0.ndim, dtype=x0.dtype, device=x0.device)
        return alpha * x0 + sigma * noise

    def snr(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2`` of shape (B,), on ``t``'s device."""
        t = torch.as_tensor(t)
        ac = self._gather(t)
        return (ac / (1.0 - ac)).to(device=t.device, dtype=dtype)

    # ----- configuration -------------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; :meth:`from_config` rebuilds the schedule."""
        return {
            "kind": self.kind,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Rebuild a schedule from :meth:`to_config`'s output."""
        return cls(**config)

    def to_diffusers_scheduler_config(self) -> dict[str, Any]:
        """The schedule part of a diffusers ``scheduler_config.json`` (no class name, no prediction type)."""
        return {
            "num_train_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": _DIFFUSERS_BETA_SCHEDULE[self.kind],
            "rescale_betas_zero_snr": self.zero_terminal_snr,
        }

    @classmethod
    def from_diffusers_scheduler_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict; keys other than the schedule's are ignored.

        Raises:
            ValueError: for ``trained_betas`` or a ``beta_schedule`` we do not implement.
        """
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config uses explicit 'trained_betas', which NoiseSchedule does not support")
        name = config.get("beta_schedule", "linear")
        kinds = {v: k for k, v in _DIFFUSERS_BETA_SCHEDULE.items()}
        if name not in kinds:
            raise ValueError(f"Unsupported diffusers beta_schedule {name!r}; supported: {', '.join(kinds)}")
        return cls(
            kind=kinds[name],
            num_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )
