"""Convolutional pieces of the Stable Diffusion UNet, named as in CompVis ``openaimodel``.

``ResBlock`` keeps CompVis' ``in_layers``/``emb_layers``/``out_layers``/``skip_connection`` names
(sequential indices included), the resamplers keep ``op`` (down) and ``conv`` (up, :class:`ldm.nn.layers.Upsample`), so original SD
checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.layers import group_norm


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosine half first, as in SD.

    Equals diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    Args:
        timesteps: 1-D tensor of B timesteps (int or float).
        dim: Embedding width; odd widths get a trailing zero column.
        max_period: Lowest frequency is ``1 / max_period``.

    Returns:
        Float32 tensor of shape (B, dim).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (CompVis' ``zero_module``) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added as a per-channel bias).

    ``h = in_layers(x) + emb_layers(emb)``; ``out = skip_connection(x) + out_layers(h)``.

    Args:
        channels: Input channels.
        emb_channels: Width of the timestep embedding.
        out_channels: Output channels (default: ``channels``); a 1x1 ``skip_connection`` conv maps
            the input when they differ.
        dropout: Dropout before the second conv.
        norm_groups: Upper bound on GroupNorm groups.
        use_checkpoint: Recompute this block in the backward pass (when grad is enabled).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.gradient_checkpointing = use_checkpoint

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply to ``x`` (B, C, H, W) with timestep embedding ``emb`` (B, emb_channels)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class UNetDownsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv, padding 1 (stored as ``op`` like CompVis)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)
