"""The samplers by name, each with the facts its callers need: one table that :func:`ldm.diffusion.sampling.sample`,
the pipeline, validation sampling and the CLI read, so that a sampler's properties are stated once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.diffusion.euler import sample_euler, sample_euler_ancestral, sample_heun
from ldm.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m

__all__ = ["KARRAS_SAMPLERS", "SAMPLERS", "SAMPLER_REGISTRY", "SamplerInfo", "sampler_info"]


@dataclass(frozen=True)
class SamplerInfo:
    """What a named sampler is and takes.

    Args:
        name: The name users pass (``ldm generate --sampler``, ``pipe(..., sampler=)``, ``val_sampler``).
        function: ``function(denoiser, x, schedule, timesteps, prediction_type, **kwargs)``.
        convention: The timestep layout (``sampling_timesteps`` convention) of its diffusers scheduler; also
            how ``noise_to_step`` reads the noise level of a step (``ddim``: ``alphas_cumprod`` at integer timesteps,
            ``dpmsolver``/``euler``: that scheduler's sigmas).
        space: ``"timestep"``: it steps over ``alphas_cumprod`` and hands the denoiser integer timesteps;
            ``"sigma"``: it integrates in sigma space and hands the denoiser float timesteps (it takes ``spacing``).
        stochastic: It draws fresh noise from its generator at every step.
        supports_karras: It takes ``use_karras_sigmas``.
        takes_eta: It takes DDIM's ``eta`` (noise scale); with ``eta > 0`` it draws noise at every step.
        takes_final_sigmas_type: It takes :class:`~ldm.diffusion.SamplerConfig`'s ``final_sigmas_type``.
    """

    name: str
    function: Callable[..., torch.Tensor]
    convention: str
    space: str
    stochastic: bool
    supports_karras: bool
    takes_eta: bool = False
    takes_final_sigmas_type: bool = False

    def draws_noise(self, eta: float = 0.0) -> bool:
        """Whether a run with this ``eta`` draws noise from the generator at every step."""
        return self.stochastic or (self.takes_eta and eta > 0)


SAMPLER_REGISTRY: dict[str, SamplerInfo] = {info.name: info for info in (
    SamplerInfo("ddpm", sample_ddpm, "ddim", "timestep", stochastic=True, supports_karras=False),
    SamplerInfo("ddim", sample_ddim, "ddim", "timestep", stochastic=False, supports_karras=False, takes_eta=True),
    SamplerInfo("dpmpp_2m", sample_dpmpp_2m, "dpmsolver", "timestep", stochastic=False, supports_karras=True,
                takes_final_sigmas_type=True),
    SamplerInfo("euler", sample_euler, "euler", "sigma", stochastic=False, supports_karras=True, takes_final_sigmas_type=True),
    SamplerInfo("euler_a", sample_euler_ancestral, "euler", "sigma", stochastic=True, supports_karras=True),
    SamplerInfo("heun", sample_heun, "euler", "sigma", stochastic=False, supports_karras=True),
)}

# Views of the registry, under the names earlier code and the README use.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {name: info.function for name, info in SAMPLER_REGISTRY.items()}
KARRAS_SAMPLERS = tuple(name for name, info in SAMPLER_REGISTRY.items() if info.supports_karras)


def sampler_info(name: str) -> SamplerInfo:
    """The registry entry of sampler ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        return SAMPLER_REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLER_REGISTRY)}") from None
