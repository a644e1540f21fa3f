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


def caption_drop_mask(count: int, probability: float, generator: torch.Generator,
                      rates: torch.Tensor | None = None) -> torch.Tensor:
    """Which of ``count`` captions conditioning dropout drops (each with ``probability``), a bool tensor on the
    generator's device; no draw when no caption can be dropped.

    ``rates``: per caption, its own probability where >= 0 (a data row's ``caption_dropout``, as kohya's per-subset
    ``caption_dropout_rate``), ``probability`` where negative; the same single draw per caption either way.
    """
    probabilities = torch.full((count,), float(probability), device=generator.device)
    if rates is not None:
        rates = torch.as_tensor(rates, dtype=torch.float32).to(generator.device)
        probabilities = torch.where(rates >= 0, rates, probabilities)
    if not bool((probabilities > 0).any()):
        return torch.zeros(count, dtype=torch.bool, device=generator.device)
    return torch.rand(count, generator=generator, device=generator.device) < probabilities


def drop_captions(prompts: list[str], probability: float, generator: torch.Generator,
                  rates: torch.Tensor | None = None) -> list[str]:
    """Replace each prompt by the empty prompt with ``probability`` (conditioning dropout for CFG), or with its own
    rate where ``rates`` gives one (:func:`caption_drop_mask`)."""
    drop = caption_drop_mask(len(prompts), probability, generator, rates).tolist()
    return ["" if d else p for p, d in zip(prompts, drop)]
