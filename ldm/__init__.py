"""ldm: latent text-to-image diffusion on PyTorch Lightning."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from ldm import LatentDiffusionPipeline` without importing torch/transformers for `import ldm`.
    if name == "LatentDiffusionPipeline":
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
