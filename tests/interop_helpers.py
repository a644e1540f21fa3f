"""diffusers model configurations (tiny ones and the published SD 1.5/2.x UNets) and helpers shared by the tests."""

from __future__ import annotations

import torch

# The published SD 1.5 and SD 2.x UNet configs (built on the meta device only).
SD15_DIFFUSERS = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD2_DIFFUSERS = dict(SD15_DIFFUSERS, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
TINY_UNET_DIFFUSERS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=16,
    norm_num_groups=32,
)
TINY_V1 = dict(TINY_UNET_DIFFUSERS, attention_head_dim=8)  # 8 heads at every level, conv projections
TINY_V2 = dict(TINY_UNET_DIFFUSERS, attention_head_dim=(2, 4), use_linear_projection=True)  # 16-wide heads, linear
# Stable Diffusion 1.x/2.x VAE as a diffusers AutoencoderKL config.
SD_VAE_DIFFUSERS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)

TINY_VAE_DIFFUSERS = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Small random values for every parameter (diffusers and we zero-initialise some layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_clip_config(**overrides):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=1000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)

# The published SDXL 1.0 base UNet config (diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_DIFFUSERS = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# A tiny SDXL-shaped UNet: no attention at the first level, 1 and 2 transformer blocks below, 8-wide heads, linear
# projections, a 32-wide context, and the text_time vector (pooled 16 + 6 ids x 8 = 64).
TINY_SDXL_UNET_DIFFUSERS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64,
    norm_num_groups=8,
)
