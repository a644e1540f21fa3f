"""The KL autoencoder as a plain ``nn.Module``: encoder, decoder and the two 1x1 "quant" convs.

Its state-dict keys are exactly those of Stable Diffusion's ``first_stage_model`` (minus that prefix),
so the same module serves training, the pipeline and the checkpoint converters.

Built with ``with_encoder=False`` it is the decoder half only (training from precomputed latents): loading a
whole VAE's state dict into it hashes the encoder's weights (:meth:`KLAutoencoder.encoder_fingerprint`) and
drops them, so they are never built, moved to a device or written to a checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ldm.nn.distributions import DiagonalGaussianDistribution
from ldm.nn.vae import Decoder, Encoder


class KLAutoencoder(nn.Module):
    """Image <-> latent with a diagonal-Gaussian posterior. See :class:`ldm.nn.vae.Encoder` for the arguments;
    ``with_encoder=False`` builds the decoder half only (see the module docstring)."""

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
        with_encoder: bool = True,
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
        self.encoder: Encoder | None = None
        self.quant_conv: nn.Conv2d | None = None
        if with_encoder:
            self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        if with_encoder:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        else:  # the encoder's keys, shapes and dtypes in state-dict order, from a weightless copy
            with torch.device("meta"):
                skeleton = nn.ModuleDict({"encoder": Encoder(in_channels=in_channels, double_z=True, **common),
                                          "quant_conv": nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)})
            self.encoder_state_spec = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
        self._encoder_fingerprint: str | None = None
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images in [-1, 1], shape (B, C, H, W) -> posterior over latents (B, embed_dim, H/f, W/f)."""
        if self.encoder is None:
            raise RuntimeError("this VAE was built without its encoder (with_encoder=False, for training from precomputed "
                               "latents), so it cannot encode images: build it with its encoder")
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

    def encoder_fingerprint(self) -> str:
        """A short hash of what turns images into posterior moments: the ``encoder`` and ``quant_conv`` weights as
        stored (a half-precision copy hashes differently from the fp32 one). Two VAEs with the same hash give the
        same moments, whatever their decoders. Without an encoder: the hash of the weights it dropped on loading.
        """
        if self.encoder is not None:
            return _weights_hash([*self.encoder.state_dict().values(), *self.quant_conv.state_dict().values()])
        if self._encoder_fingerprint is None:
            raise RuntimeError("this VAE was built without its encoder and has loaded no weights yet, so its encoder has "
                               "no fingerprint: load a whole VAE's state dict into it first")
        return self._encoder_fingerprint

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a VAE built without its encoder takes a whole VAE's state dict, hashes
        the encoder's weights (in the dtype its own would have had) and drops them."""
        if self.encoder is not None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        spec = self.encoder_state_spec
        missing = [k for k in spec if k not in state_dict]
        wrong = [f"{k} {tuple(state_dict[k].shape)} vs {spec[k][0]}" for k in spec if k in state_dict
                 and tuple(state_dict[k].shape) != spec[k][0]]
        if strict and (missing or wrong):
            raise RuntimeError(f"the VAE encoder's weights do not fit: missing {missing[:5]}, wrong shapes {wrong[:5]}")
        if not missing and not wrong:
            self._encoder_fingerprint = _weights_hash(state_dict[k].to(spec[k][1]) for k in spec)
        rest = {k: v for k, v in state_dict.items() if k not in spec}
        return super().load_state_dict(rest, strict=strict, assign=assign)


def _weights_hash(tensors) -> str:
    """16 hex digits of SHA-1 over a fixed tag and the tensors' bytes (``ldm.data.fingerprints.fingerprint`` of
    ``"vae-encoder"`` and these tensors, so precomputed latents written before stay valid)."""
    h = hashlib.sha1(b'["vae-encoder"]')
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
