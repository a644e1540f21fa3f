"""The Python inference API: load a model in any layout, generate, img2img, inpaint, save. Free of Lightning."""

from ldm.pipeline.pipeline import LatentDiffusionPipeline

__all__ = ["LatentDiffusionPipeline"]
