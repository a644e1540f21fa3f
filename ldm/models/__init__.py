"""LightningModules (training) and the callbacks they need."""

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.callbacks import SavePretrained

__all__ = ["AutoencoderKL", "SavePretrained"]
