"""The Stable Diffusion conditional UNet, with CompVis ``openaimodel.UNetModel``'s state-dict names.

An original SD checkpoint's ``model.diffusion_model.*`` entries (prefix removed) load into
:class:`UNetModel` as they are: ``time_embed.{0,2}``, ``input_blocks.N.{0,1}``, ``middle_block.{0,1,2}``,
``output_blocks.N.{0,1,2}``, ``out.{0,2}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.nn.attention import BasicTransformerBlock, SpatialTransformer
from ldm.nn.unet_blocks import ResBlock, UNetDownsample, UNetUpsample, group_norm, timestep_embedding, zero_init


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

    Defaults are SD v1.x. For SD v2.x use ``num_head_channels=64, context_dim=1024,
    use_linear_in_transformer=True``.

    Args:
        in_channels: Channels of the input latent.
        out_channels: Channels of the prediction.
        model_channels: Base width; level ``i`` has ``model_channels * channel_mult[i]`` channels and
            the timestep embedding has ``4 * model_channels``.
        channel_mult: Width multiplier per resolution level; the UNet downsamples
            ``len(channel_mult) - 1`` times.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: Downsampling factors (1 = full latent resolution, 2 = after one
            downsample, ...) whose levels get a SpatialTransformer after each ResBlock.
        num_heads: Attention heads per transformer when ``num_head_channels`` is -1 (SD v1: 8).
        num_head_channels: Channels per head (SD v2: 64); heads = channels // this. -1 to use
            ``num_heads`` instead.
        context_dim: Channels of the conditioning tokens (CLIP hidden size: 768 for SD v1, 1024 for
            SD v2). ``None`` builds an unconditional UNet whose ``attn2`` is a second self-attention
            (CompVis' behaviour); ``forward`` then takes no context.
        transformer_depth: BasicTransformerBlocks per SpatialTransformer.
        use_linear_in_transformer: Linear ``proj_in``/``proj_out`` on tokens (SD v2) instead of 1x1
            convs (SD v1).
        dropout: Dropout in ResBlocks and transformer blocks.
        norm_groups: GroupNorm groups (SD: 32); reduced to the largest divisor of a layer's channels
            for tiny models.
        use_checkpoint: Gradient checkpointing of every ResBlock and transformer block while grad is
            enabled (trades compute for memory); see :meth:`set_gradient_checkpointing`.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int = 8,
        num_head_channels: int = -1,
        context_dim: int | None = 768,
        transformer_depth: int = 1,
        use_linear_in_transformer: bool = False,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1 and num_heads <= 0:
            raise ValueError(f"num_heads must be positive when num_head_channels is -1, got {num_heads}")
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.context_dim = context_dim
        self.downsampling_factor = 2 ** (len(self.channel_mult) - 1)
        emb_dim = 4 * model_channels

        def heads_for(ch: int) -> tuple[int, int]:
            """(heads, head width) of a transformer at ``ch`` channels."""
            if num_head_channels == -1:
                if ch % num_heads:
                    raise ValueError(f"{ch} channels are not divisible by num_heads={num_heads}")
                return num_heads, ch // num_heads
            if num_head_channels <= 0 or ch % num_head_channels:
                raise ValueError(f"{ch} channels are not divisible by num_head_channels={num_head_channels}")
            return ch // num_head_channels, num_head_channels

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout, norm_groups, use_checkpoint)

        def transformer(ch: int) -> SpatialTransformer:
            heads, d_head = heads_for(ch)
            return SpatialTransformer(
                ch, heads, d_head, transformer_depth, context_dim, dropout, use_linear_in_transformer, norm_groups, use_checkpoint
            )

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(UNetDownsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), transformer(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(UNetUpsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, norm_groups), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn gradient checkpointing of all ResBlocks and transformer blocks on or off."""
        for module in self.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.gradient_checkpointing = enabled

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from a noisy latent.

        Args:
            x: Latents (B, in_channels, H, W); H and W must be multiples of ``downsampling_factor``.
            timesteps: (B,) timesteps, int or float (a scalar is broadcast over the batch).
            context: Conditioning tokens (B, L, context_dim), all L attended (no mask); ``None``
                only for an unconditional model (``context_dim=None``).

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

        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
