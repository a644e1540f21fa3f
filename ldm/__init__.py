"""ldm: latent text-to-image diffusion on PyTorch Lightning."""
__version__ = "0.1.0"
