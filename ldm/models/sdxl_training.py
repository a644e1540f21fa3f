"""SDXL's conditioning while ``LatentDiffusion`` trains and validates: both text encoders' tokens and pooled embedding,
caption dropout that zeroes both (as SGM trains, and as SDXL samples without a negative prompt), and the size/crop
micro-conditioning the data layer records per sample (``size_conditioning``: original height and width, crop top and
left) with the training resolution as the target size."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ldm.diffusion import caption_drop_mask
from ldm.nn.micro_conditioning import sdxl_vector
from ldm.nn.sdxl_conditioning import sdxl_conditioning

if TYPE_CHECKING:
    from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)

__all__ = ["sdxl_generation_conditioning", "sdxl_training_conditioning"]


def sdxl_training_conditioning(model: LatentDiffusion, batch: dict[str, Any], generator: torch.Generator, dropout: float,
                               image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context, y)`` of a batch: its captions' embeddings (the batch's cached ones when the encoders are frozen),
    zeroed where caption dropout hits, and the vector of pooled text + size ids (target: ``image_hw``)."""
    texts = list(batch["text"])
    drop = caption_drop_mask(len(texts), dropout, generator, batch.get("caption_dropout")).to(model.device)
    if "context" in batch and "pooled" in batch and not model.text_encoder.trainable:
        context, pooled = batch["context"].to(model.device).float(), batch["pooled"].to(model.device).float()
    else:
        context, pooled = model.encode_text(texts)
    keep = (~drop).to(context.dtype)
    context, pooled = context * keep[:, None, None], pooled * keep[:, None]
    sizes = batch.get("size_conditioning")
    if sizes is None:
        if not getattr(model, "_warned_no_sizes", False):
            model._warned_no_sizes = True
            log.warning("the batches carry no size_conditioning (original size, crop): SDXL's micro-conditioning uses "
                        "the training size and no crop for every sample")
        sizes = torch.tensor([[*image_hw, 0.0, 0.0]] * len(texts))
    target = torch.tensor([list(image_hw)] * len(texts), dtype=torch.float32)
    ids = torch.cat([sizes.float().cpu(), target], dim=1).to(model.device)
    return context, sdxl_vector(pooled, ids, model.unet.config.addition_time_embed_dim)


@torch.no_grad()
def sdxl_generation_conditioning(model: LatentDiffusion, prompts: list[str], height: int, width: int
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(context, uncond, y, uncond_y)`` for validation samples at ``height x width`` pixels: zero unconditional
    embeddings (what caption dropout trained), no crop, original size = target size."""
    return sdxl_conditioning(model.text_encoder, model.unet.config.addition_time_embed_dim, True, prompts,
                             [""] * len(prompts), True, 1, height, width)
