"""Text-to-latent sampling with classifier-free guidance: the CFG denoiser around a text-conditional UNet, shared by
validation sampling and the pipeline."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.sampler_config import SamplerConfig
from ldm.diffusion.sampling import sample
from ldm.diffusion.schedule import NoiseSchedule


def guided_denoiser(
    unet: nn.Module, context: torch.Tensor, uncond_context: torch.Tensor | None, guidance_scale: float, guidance_rescale: float = 0.0,
    y: torch.Tensor | None = None, uncond_y: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A denoiser ``(x_t, t) -> model output`` that applies CFG with one batched UNet call; ``y``/``uncond_y`` are the
    vector conditioning of a UNet that takes one (SDXL), for the prompt and the unconditional branch."""
    dtype = next(unet.parameters()).dtype
    if (y is None and uncond_y is not None) or (y is not None and uncond_context is not None and uncond_y is None):
        raise ValueError("give the vector conditioning of both branches (y and uncond_y) or of neither")

    guided = uncond_context is not None and guidance_scale != 1.0
    # The conditioning of both branches, batched once for all the sampler's steps.
    both_context = torch.cat([context, uncond_context]) if guided else context
    vector = {} if y is None else {"y": torch.cat([y, uncond_y]) if guided else y}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        if not guided:
            return unet(x, t, context, **vector).float()
        out = unet(torch.cat([x, x]), torch.cat([t, t]), both_context, **vector).float()
        cond, uncond = out.chunk(2)
        return classifier_free_guidance(cond, uncond, guidance_scale, guidance_rescale)

    return denoise


@torch.no_grad()
def sample_latents(
    unet: nn.Module,
    context: torch.Tensor,
    uncond_context: torch.Tensor | None,
    schedule: NoiseSchedule,
    prediction_type: str,
    latent_shape: tuple[int, int, int],
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    sampler: str = "dpmpp_2m",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    config: SamplerConfig = SamplerConfig(),
    y: torch.Tensor | None = None,
    uncond_y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one latent per row of ``context`` (B, L, D) following the model's sampler ``config``; returns
    (B, *latent_shape) latents (scaled). ``y``/``uncond_y``: the vector conditioning of an SDXL UNet."""
    if noise is None:
        noise = torch.randn((context.shape[0], *latent_shape), generator=generator, device=context.device)
    denoiser = guided_denoiser(unet, context, uncond_context, guidance_scale, y=y, uncond_y=uncond_y)
    # ``sample`` hands the generator only to samplers that draw noise (eta is 0 here, so DDIM does not).
    return sample(sampler, denoiser, noise.float(), schedule, num_steps, prediction_type=prediction_type, config=config,
                  generator=generator)
