"""Encoder and Decoder of the KL autoencoder (Stable Diffusion's first stage when configured so).

SD v1/v2 VAE: ``ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, attn_resolutions=()``
with mid-block attention, at resolution 256 (the resolution only decides where ``attn_resolutions``
apply). The number of downsamplings is ``len(ch_mult) - 1``, so the spatial factor is
``2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.configs import AutoencoderConfig
from ldm.nn.layers import Upsample, group_norm
from ldm.nn.vae_blocks import AttnBlock, Downsample, MidBlock, ResnetBlock


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` and an optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Encoder(nn.Module):
    """Image -> latent moments (``2 * z_channels`` when ``double_z``) at ``1 / 2**(len(ch_mult)-1)`` size."""

    def __init__(self, config: AutoencoderConfig, double_z: bool = True):
        super().__init__()
        c = config
        ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout = (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels,
                                                                          c.norm_groups, c.dropout)
        attn_resolutions, mid_attention = c.attn_resolutions, c.mid_attention
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        widths = [ch * m for m in (1, *ch_mult)]
        res = c.resolution
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = widths[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = MidBlock(block_in, dropout, norm_groups, mid_attention)
        self.norm_out = group_norm(block_in, norm_groups, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``z`` -> image; mirrors the Encoder with ``num_res_blocks + 1`` blocks per level.

    ``up`` is indexed like SD's checkpoints: ``up[0]`` is the highest-resolution level, and levels run
    from the last (lowest resolution) to the first.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout = (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels,
                                                                          c.norm_groups, c.dropout)
        attn_resolutions, mid_attention = c.attn_resolutions, c.mid_attention
        block_in = ch * ch_mult[-1]
        res = c.resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout, norm_groups, mid_attention)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
