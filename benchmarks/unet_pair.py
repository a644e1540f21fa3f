"""Our ``UNetModel`` and diffusers' ``UNet2DConditionModel`` with the same configuration and the same weights.

Our UNet is built from a :class:`~ldm.nn.configs.UNetConfig`, given small random weights (CompVis and diffusers
zero-initialise the output layers, which would make every output 0), then converted with our key map
(``ldm_to_diffusers_unet``) into a diffusers model built from ``unet_config_to_diffusers``. Used by
``unet_step.py`` and ``generation.py``.
"""

from __future__ import annotations

import torch

from ldm.formats.unet_keys import ldm_to_diffusers_unet, unet_config_to_diffusers
from ldm.nn.configs import UNetConfig
from ldm.nn.unet import UNetModel

# configs/diffusion/digits.yaml's UNet (context 64 = the demo text encoder's width); 8x8x4 latents.
DEMO_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                       num_heads=-1, num_head_channels=32, context_dim=64)
# SD v1.x's UNet layout at 1/5 of its width (64 instead of 320 channels), 8 heads, CLIP-L context width.
SD_SHAPED_SMALL = UNetConfig(model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2, 1),
                             num_heads=8, context_dim=768)
# Stable Diffusion 1.5's UNet (860 M parameters).
SD15_UNET = UNetConfig()


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Small normal random values for every parameter (norm weights around 1), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(noise + 1 if name.endswith("weight") and p.ndim == 1 else noise)
    return module


def build_pair(config: UNetConfig, seed: int = 0, sample_size: int | None = None) -> tuple[UNetModel, torch.nn.Module]:
    """``(ours, diffusers')``, identical weights, both in train mode on the CPU in fp32."""
    from diffusers import UNet2DConditionModel

    fields = config.to_dict()
    ours = randomize_(UNetModel(config), seed)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(fields, sample_size=sample_size))
    theirs.load_state_dict(ldm_to_diffusers_unet(ours.state_dict(), fields), strict=True)
    return ours, theirs


def unet_inputs(config: UNetConfig, batch: int, size: int, tokens: int = 77, device: str | torch.device = "cpu",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents ``(batch, in_channels, size, size)``, integer timesteps and a context ``(batch, tokens, context_dim)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, config.context_dim, generator=g)
    return x.to(device), t.to(device), context.to(device)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
