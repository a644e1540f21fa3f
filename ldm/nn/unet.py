"""The Stable Diffusion conditional UNet, with CompVis ``openaimodel.UNetModel``'s state-dict names.

An original SD checkpoint's ``model.diffusion_model.*`` entries (prefix removed) load into
:class:`UNetModel` as they are: ``time_embed.{0,2}``, ``input_blocks.N.{0,1}``, ``middle_block.{0,1,2}``,
``output_blocks.N.{0,1,2}``, ``out.{0,2}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.nn.configs import UNetConfig, level_depths, middle_depth
from ldm.nn.attention import BasicTransformerBlock, SpatialTransformer
from ldm.nn.layers import Upsample, group_norm
from ldm.nn.unet_blocks import ResBlock, UNetDownsample, timestep_embedding, zero_init


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Conditional UNet of Stable Diffusion: predicts noise (or v) from a noisy latent, timestep and text.

    Built from a :class:`~ldm.nn.configs.UNetConfig` (its docstring lists the knobs; the defaults are SD v1.x), or
    from the same fields as keywords: ``UNetModel(model_channels=64, ...)``.
    """

    def __init__(self, config: UNetConfig | None = None, **fields: Any):
        super().__init__()
        self.config = c = config if config is not None else UNetConfig(**fields)
        if c.num_head_channels == -1 and c.num_heads <= 0:
            raise ValueError(f"num_heads must be positive when num_head_channels is -1, got {c.num_heads}")
        if not c.channel_mult:
            raise ValueError("channel_mult must list at least one level")
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.model_channels = c.model_channels
        self.channel_mult = tuple(c.channel_mult)
        self.num_res_blocks = c.num_res_blocks
        self.attention_resolutions = tuple(c.attention_resolutions)
        self.context_dim = c.context_dim
        self.downsampling_factor = 2 ** (len(self.channel_mult) - 1)
        emb_dim = 4 * c.model_channels

        def heads_for(ch: int) -> tuple[int, int]:
            """(heads, head width) of a transformer at ``ch`` channels."""
            if c.num_head_channels == -1:
                if ch % c.num_heads:
                    raise ValueError(f"{ch} channels are not divisible by num_heads={c.num_heads}")
                return c.num_heads, ch // c.num_heads
            if c.num_head_channels <= 0 or ch % c.num_head_channels:
                raise ValueError(f"{ch} channels are not divisible by num_head_channels={c.num_head_channels}")
            return ch // c.num_head_channels, c.num_head_channels

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, c.dropout, c.norm_groups, c.use_checkpoint)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, d_head = heads_for(ch)
            return SpatialTransformer(
                ch, heads, d_head, depth, c.context_dim, c.dropout, c.use_linear_in_transformer, c.norm_groups, c.use_checkpoint
            )

        depths = level_depths(c)
        self.adm_in_channels = c.adm_in_channels
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.adm_in_channels is not None:  # SGM's "sequential" label embedding of the vector y (SDXL)
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
        skip_channels = [c.model_channels]
        ch, ds = c.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, c.model_channels * mult)]
                ch = c.model_channels * mult
                if depths[level]:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(UNetDownsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), transformer(ch, middle_depth(c)), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if depths[level]:
                    layers.append(transformer(ch, depths[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, c.norm_groups), nn.SiLU(), zero_init(nn.Conv2d(ch, c.out_channels, 3, padding=1))
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn gradient checkpointing of all ResBlocks and transformer blocks on or off."""
        for module in self.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.gradient_checkpointing = enabled

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from a noisy latent.

        Args:
            x: Latents (B, in_channels, H, W); H and W must be multiples of ``downsampling_factor``.
            timesteps: (B,) timesteps, int or float (a scalar is broadcast over the batch).
            context: Conditioning tokens (B, L, context_dim), all L attended (no mask); ``None``
                only for an unconditional model (``context_dim=None``).
            y: The vector conditioning (B, adm_in_channels) of a UNet with ``adm_in_channels`` (SDXL:
                pooled text and the embedded size/crop ids, :func:`ldm.nn.micro_conditioning.sdxl_vector`).

        Returns:
            Prediction of shape (B, out_channels, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h_size, w_size = x.shape[-2:]
        f = self.downsampling_factor
        if h_size % f or w_size % f:
            raise ValueError(
                f"latent size {h_size}x{w_size} is not a multiple of {f} (2 ** (len(channel_mult) - 1)); "
                f"crop or pad the latents (images) to a multiple of {f}"
            )
        if self.context_dim is not None:
            if context is None:
                raise ValueError(f"this UNet is conditional (context_dim={self.context_dim}): pass context (B, L, {self.context_dim})")
            if context.ndim != 3 or context.shape[-1] != self.context_dim:
                raise ValueError(f"expected context of shape (B, L, {self.context_dim}), got {tuple(context.shape)}")
        elif context is not None:
            raise ValueError("this UNet was built with context_dim=None and takes no context")

        if self.adm_in_channels is not None:
            if y is None or y.ndim != 2 or y.shape != (x.shape[0], self.adm_in_channels):
                got = "none" if y is None else f"shape {tuple(y.shape)}"
                raise ValueError(f"this UNet takes the vector conditioning y of shape ({x.shape[0]}, {self.adm_in_channels}) "
                                 f"(SDXL: pooled text + size/crop ids), got {got}")
        elif y is not None:
            raise ValueError("this UNet was built without adm_in_channels and takes no vector conditioning y")

        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
