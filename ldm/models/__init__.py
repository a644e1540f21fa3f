"""LightningModules (training) and the callbacks they need."""

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.callbacks import SavePretrained
from ldm.models.latent_diffusion import LatentDiffusion

__all__ = ["AutoencoderKL", "LatentDiffusion", "SavePretrained"]
