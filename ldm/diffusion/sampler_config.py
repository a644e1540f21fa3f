"""How a model's sampling steps are laid out and how the last one ends: the settings of a diffusers scheduler
config beyond the noise schedule itself, kept with the model so that every sampler follows them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ldm.diffusion.timesteps import TIMESTEP_SPACINGS

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class SamplerConfig:
    """Timestep layout and final-step settings of a model's sampler (diffusers' ``scheduler_config.json`` names).

    Args:
        timestep_spacing: ``leading``, ``trailing`` or ``linspace`` (Lin et al. 2023, Table 2).
        steps_offset: Added to ``leading`` timesteps (1 in Stable Diffusion: the original samplers visit
            ``t = 1 + k * T // n``).
        set_alpha_to_one: DDIM's step after the last timestep goes to ``alphas_cumprod = 1`` (True) or to
            ``alphas_cumprod[0]`` (False: the original CompVis/Stability ``DDIMSampler`` and SD's diffusers configs).
        final_sigmas_type: DPM-Solver++ and Euler end at sigma ``zero`` or at ``sigma_min``, the schedule's
            smallest noise level ``sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])``.
        lower_order_final: DPM-Solver++ takes a first-order last step when there are fewer than 15 steps
            (always when it ends at sigma zero).
        euler_at_final: DPM-Solver++ always takes a first-order last step.
    """

    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __post_init__(self) -> None:
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {self.timestep_spacing!r}")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {', '.join(FINAL_SIGMAS_TYPES)}, got {self.final_sigmas_type!r}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")

    def to_dict(self) -> dict[str, Any]:
        """The settings under diffusers' key names (JSON-able)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any], **defaults: Any) -> SamplerConfig:
        """The settings found in ``config`` (other keys are ignored); missing ones from ``defaults``, else ours."""
        return cls(**{**defaults, **{k: v for k, v in config.items() if k in _NAMES}})

    @classmethod
    def split(cls, config: dict[str, Any], **defaults: Any) -> tuple[SamplerConfig, dict[str, Any]]:
        """``(settings, the rest of config)``: :meth:`from_dict` and the keys that are not ours."""
        return cls.from_dict(config, **defaults), {k: v for k, v in config.items() if k not in _NAMES}

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> SamplerConfig:
        """From a diffusers scheduler config, with diffusers' defaults for what it leaves out: those of
        ``DDIMScheduler`` (``set_alpha_to_one=True``, ``steps_offset=0``) and ``DPMSolverMultistepScheduler``,
        which is what ``DDIMScheduler.from_config(folder_config)`` and its kin would use."""
        return cls.from_dict(config, set_alpha_to_one=True)


_NAMES = frozenset(f.name for f in fields(SamplerConfig))
