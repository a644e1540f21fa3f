"""Export of a trained ``LatentDiffusion``: the whole model as a folder a pipeline loads, or a LoRA run's adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.formats.components import ModelComponents
from ldm.formats.lightning_ckpt import source_vae
from ldm.formats.load import load_components
from ldm.formats.kohya_lora import save_kohya_lora
from ldm.formats.lora_files import DIFFUSERS_LORA_FILE, save_lora
from ldm.formats.save import save_components
from ldm.nn.autoencoder import KLAutoencoder

if TYPE_CHECKING:
    from ldm.models.latent_diffusion import LatentDiffusion

__all__ = ["save_trained", "whole_vae"]


def whole_vae(model: LatentDiffusion) -> KLAutoencoder:
    """The model's VAE; without its encoder, the VAE re-read from the source (``autoencoder`` or ``init_from``),
    checked against the encoder fingerprint taken at construction, carrying the model's decoder weights."""
    if model.autoencoder.encoder is not None:
        return model.autoencoder
    source = model.hparams.init_from or model.hparams.autoencoder
    whole = source_vae(model.hparams, load_components)
    if whole.encoder_fingerprint() != model.autoencoder.encoder_fingerprint():
        raise ValueError(f"the VAE encoder in {source} changed since this model was built (fingerprint "
                         f"{whole.encoder_fingerprint()}, was {model.autoencoder.encoder_fingerprint()}): export from "
                         "the source it was trained with")
    whole.load_state_dict({**whole.state_dict(), **model.autoencoder.state_dict()})
    return whole.to(model.autoencoder.post_quant_conv.weight.dtype)


def save_trained(model: LatentDiffusion, path: str | Path) -> Path:
    """What :meth:`LatentDiffusion.save_pretrained` writes: a LoRA run's adapters (diffusers' file name and key
    layout, or kohya's with ``lora_format="kohya"``) plus ``lora_info.json``, else the whole model as an ldm folder. Returns the file or folder written."""
    h = model.hparams
    if model.is_lora:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        # SDXL: both text encoders' adapters (the DualTextEncoder), else the CLIP model's.
        text = (model.text_encoder if model.is_sdxl else model.text_encoder.model) if h.lora_text_encoder else None
        layout = getattr(h, "lora_format", "diffusers")
        if layout == "kohya":
            # An earlier diffusers-layout export here would be the file pipe.load_lora(folder) reads first.
            (folder / DIFFUSERS_LORA_FILE).unlink(missing_ok=True)
            file = save_kohya_lora(folder / f"{folder.resolve().name}.safetensors", unet=model.unet, text_encoder=text)
        else:
            file = save_lora(folder / DIFFUSERS_LORA_FILE, unet=model.unet, text_encoder=text)
        info = {"base_model": h.init_from, "rank": h.lora_rank, "alpha": h.lora_alpha or h.lora_rank,
                "text_encoder": h.lora_text_encoder, "format": layout, "file": file.name}
        (folder / "lora_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return file
    parts = ModelComponents(model.unet, whole_vae(model), model.text_encoder, model.schedule, model.prediction_type,
                            float(model.scaling_factor), model._latent_size() * model.autoencoder.downsampling_factor,
                            model.sampler_config, force_zeros_for_empty_prompt=model.is_sdxl)
    # An SDXL model is written as a diffusers SDXL folder (what diffusers, the UIs' converters and ldm all read).
    return save_components(parts, path, "diffusers" if model.is_sdxl else "ldm")
