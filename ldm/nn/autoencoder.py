"""The KL autoencoder as a plain ``nn.Module``: encoder, decoder and the two 1x1 "quant" convs.

Its state-dict keys are exactly those of Stable Diffusion's ``first_stage_model`` (minus that prefix),
so the same module serves training, the pipeline and the checkpoint converters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.nn.distributions import DiagonalGaussianDistribution
from ldm.nn.vae import Decoder, Encoder


class KLAutoencoder(nn.Module):
    """Image <-> latent with a diagonal-Gaussian posterior. See :class:`ldm.nn.vae.Encoder` for the arguments."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        z_channels: int = 4,
        embed_dim: int = 4,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm_groups: int = 32,
    ):
        super().__init__()
        common = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            resolution=resolution,
            z_channels=z_channels,
            dropout=dropout,
            mid_attention=mid_attention,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images in [-1, 1], shape (B, C, H, W) -> posterior over latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (unscaled) -> images, nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x``; returns the reconstruction and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
