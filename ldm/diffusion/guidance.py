"""Classifier-free guidance (Ho & Salimans 2022): its training half (caption dropout) and its sampling half
(guided outputs, with optional std rescaling, Lin et al. 2023)."""

from __future__ import annotations

import torch


def classifier_free_guidance(
    cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Combine conditional and unconditional model outputs: ``uncond + scale * (cond - uncond)``.

    With ``guidance_rescale > 0`` the guided output is rescaled per sample so its standard deviation
    (over all non-batch dims) equals that of ``cond_out``, and mixed with the unrescaled one:
    ``r * rescaled + (1 - r) * guided`` (diffusers' ``rescale_noise_cfg``).
    """
    guided = uncond_out + scale * (cond_out - uncond_out)
    if guidance_rescale == 0:
        return guided
    dims = list(range(1, cond_out.ndim))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def caption_drop_mask(count: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Which of ``count`` captions conditioning dropout drops (each with ``probability``), a bool tensor on the
    generator's device; no draw when the probability is 0."""
    if probability <= 0:
        return torch.zeros(count, dtype=torch.bool, device=generator.device)
    return torch.rand(count, generator=generator, device=generator.device) < probability


def drop_captions(prompts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each prompt by the empty prompt with ``probability`` (conditioning dropout for CFG)."""
    drop = caption_drop_mask(len(prompts), probability, generator).tolist()
    return ["" if d else p for p, d in zip(prompts, drop)]
