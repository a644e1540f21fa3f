"""The KL autoencoder as a plain ``nn.Module``: encoder, decoder and the two 1x1 "quant" convs.

Its state-dict keys are exactly those of Stable Diffusion's ``first_stage_model`` (minus that prefix),
so the same module serves training, the pipeline and the checkpoint converters.

Built with ``with_encoder=False`` it is the decoder half only (training from precomputed latents): loading a
whole VAE's state dict into it hashes the encoder's weights (:meth:`KLAutoencoder.encoder_fingerprint`) and
drops them, so they are never built, moved to a device or written to a checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.nn.configs import AutoencoderConfig
from ldm.nn.distributions import DiagonalGaussianDistribution
from ldm.nn.vae import Decoder, Encoder


class KLAutoencoder(nn.Module):
    """Image <-> latent with a diagonal-Gaussian posterior, built from an
    :class:`~ldm.nn.configs.AutoencoderConfig` (or its fields as keywords: ``KLAutoencoder(ch=64, ...)``);
    ``with_encoder=False`` builds the decoder half only (see the module docstring)."""

    def __init__(self, config: AutoencoderConfig | None = None, *, with_encoder: bool = True, **fields: Any):
        super().__init__()
        self.config = c = config if config is not None else AutoencoderConfig(**fields)
        self.encoder: Encoder | None = None
        self.quant_conv: nn.Conv2d | None = None
        if with_encoder:
            self.encoder = Encoder(c, double_z=True)
        self.decoder = Decoder(c)
        if with_encoder:
            self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        else:  # the encoder's keys, shapes and dtypes in state-dict order, from a weightless copy
            with torch.device("meta"):
                skeleton = nn.ModuleDict({"encoder": Encoder(c, double_z=True),
                                          "quant_conv": nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)})
            self.encoder_state_spec = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
        self._encoder_fingerprint: str | None = None
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.downsampling_factor = c.downsampling_factor
        self.latent_channels = c.embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images in [-1, 1], shape (B, C, H, W) -> posterior over latents (B, embed_dim, H/f, W/f)."""
        if self.encoder is None:
            raise RuntimeError("this VAE was built without its encoder (with_encoder=False, for training from precomputed "
                               "latents), so it cannot encode images: build it with its encoder")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (unscaled) -> images, nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_scaled(self, latents: torch.Tensor, scaling_factor: float | torch.Tensor) -> torch.Tensor:
        """Scaled latents (what a diffusion model sees: latents x ``scaling_factor``) -> images, nominally in [-1, 1]
        and not clamped. The latents are unscaled in their own dtype, then cast to the VAE's stored dtype."""
        return self.decode((latents / scaling_factor).to(self.post_quant_conv.weight.dtype))

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
