"""Pure ``nn.Module`` building blocks (no Lightning here)."""

from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.discriminator import NLayerDiscriminator
from ldm.nn.distributions import DiagonalGaussianDistribution
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.unet import UNetModel
from ldm.nn.vae import Decoder, Encoder

__all__ = ["KLAutoencoder", "NLayerDiscriminator", "DiagonalGaussianDistribution", "DualTextEncoder", "Encoder", "Decoder",
           "UNetModel"]
