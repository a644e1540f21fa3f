"""``ModelComponents``: a loaded text-to-image model, the one shape every reader returns and every writer takes.

Readers: :func:`~ldm.formats.ldm_folder.read_ldm_folder`, :func:`~ldm.formats.diffusers_folder.read_diffusers_folder`,
:func:`~ldm.formats.sd_single_file.read_sd_single_file`, :func:`~ldm.formats.lightning_ckpt.read_lightning_checkpoint`;
:func:`~ldm.formats.load.load_components` picks the one for a path. Writer: :func:`~ldm.formats.save.save_components`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ldm.diffusion import NoiseSchedule, SamplerConfig
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig, UNetConfig
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel

__all__ = ["ModelComponents"]


@dataclass
class ModelComponents:
    """A loaded model: modules (eval mode, fp32, CPU), their configs, the schedule and how to use them."""

    unet: UNetModel
    vae: KLAutoencoder
    text_encoder: TextEncoder | DualTextEncoder  # SDXL: its two encoders
    schedule: NoiseSchedule
    prediction_type: str
    scaling_factor: float
    sample_size: int | None
    sampler_config: SamplerConfig = SamplerConfig()
    variant: str | None = None  # the Stable Diffusion family of a single file ("v1", "v2", "xl"), when read from one
    # SDXL: without a negative prompt the unconditional branch gets zero embeddings (diffusers' SDXL base default).
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        """An SDXL-style model: two text encoders and a UNet with vector conditioning."""
        return isinstance(self.text_encoder, DualTextEncoder)

    @property
    def unet_config(self) -> UNetConfig:
        """The UNet's shape (the module's own record)."""
        return self.unet.config

    @property
    def vae_config(self) -> AutoencoderConfig:
        """The autoencoder's shape (the module's own record)."""
        return self.vae.config
