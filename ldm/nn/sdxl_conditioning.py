"""SDXL's conditioning for generation: both text encoders' context and pooled embedding, the micro-conditioning ids,
and their unconditional twins, as diffusers' ``StableDiffusionXLPipeline`` builds them (each CFG branch with its own
ids, as SGM does)."""

from __future__ import annotations

import torch

from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.micro_conditioning import sdxl_vector, size_time_ids, time_ids_tensor

Size = tuple[int, int]


def _per_image(values: str | list[str] | None, name: str, prompts: int, per_prompt: int) -> list[str] | None:
    """One entry per image from a string or one entry per prompt (None stays None)."""
    if values is None:
        return None
    values = [values] * prompts if isinstance(values, str) else list(values)
    if len(values) != prompts:
        raise ValueError(f"{name} has {len(values)} entries but there are {prompts} prompts; give one per prompt or a single string")
    return [v for v in values for _ in range(per_prompt)]


@torch.no_grad()
def sdxl_conditioning(text_encoder: DualTextEncoder, time_embed_dim: int, force_zeros_for_empty_prompt: bool,
                      prompts: list[str], negatives: list[str], no_negative: bool, per_prompt: int, height: int, width: int,
                      prompt_2: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                      original_size: Size | None = None, crops_coords_top_left: Size = (0, 0), target_size: Size | None = None,
                      negative_original_size: Size | None = None, negative_crops_coords_top_left: Size | None = None,
                      negative_target_size: Size | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(context, uncond_context, y, uncond_y)`` for ``prompts`` (one per image) and their ``negatives``.

    Args:
        text_encoder: The two text encoders.
        time_embed_dim: The UNet's ``addition_time_embed_dim``.
        force_zeros_for_empty_prompt: Zero unconditional embeddings when no negative prompt was given (``no_negative``).
        per_prompt: Images per prompt (``prompt_2`` and ``negative_prompt_2`` are given per prompt).
        height, width: Output size, the default original and target size.
        original_size, crops_coords_top_left, target_size: (height, width), (top, left), (height, width).
        negative_*: The unconditional branch's; default: the positive ones.
    """
    n = len(prompts) // per_prompt
    context, pooled = text_encoder.encode_with_pooled(prompts, _per_image(prompt_2, "prompt_2", n, per_prompt))
    if no_negative and force_zeros_for_empty_prompt:
        uncond, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    else:
        uncond, uncond_pooled = text_encoder.encode_with_pooled(
            negatives, _per_image(negative_prompt_2, "negative_prompt_2", n, per_prompt) or negatives)
    size = (height, width)
    ids = size_time_ids(original_size or size, crops_coords_top_left, target_size or size)
    negative_ids = size_time_ids(negative_original_size or original_size or size,
                                 negative_crops_coords_top_left or crops_coords_top_left,
                                 negative_target_size or target_size or size)
    y = sdxl_vector(pooled, time_ids_tensor([ids] * len(prompts), pooled.device), time_embed_dim)
    uncond_y = sdxl_vector(uncond_pooled, time_ids_tensor([negative_ids] * len(prompts), pooled.device), time_embed_dim)
    return context, uncond, y, uncond_y
