"""Model formats: every reader and writer of a whole model, the LoRA file formats and the key maps between our
module names and diffusers' / the original Stable Diffusion checkpoints'.

Every reader returns one :class:`ModelComponents` (:func:`load_components` picks the reader for a path) and
:func:`save_components` writes one in any format. Depends on ``ldm.nn`` and ``ldm.diffusion`` (and
transformers/safetensors); diffusers is never imported. Names load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelComponents": "components",
    "load_components": "load",
    "save_components": "save",
    "read_ldm_folder": "ldm_folder",
    "write_pipeline_folder": "ldm_folder",
    "read_diffusers_folder": "diffusers_folder",
    "read_diffusers_states": "diffusers_folder",
    "read_vae_scaling_factor": "diffusers_folder",
    "write_diffusers_folder": "diffusers_folder",
    "read_sd_single_file": "sd_single_file",
    "write_sd_single_file": "sd_single_file",
    "read_lightning_checkpoint": "lightning_ckpt",
    "load_text_encoder": "text_encoder_files",
    "new_text_encoder": "text_encoder_files",
    "load_lora": "lora_files",
    "save_lora": "lora_files",
    "clip_state_prefix": "clip_keys",
    "openclip_to_transformers": "clip_keys",
    "sd_v1_clip_to_transformers": "clip_keys",
    "transformers_to_sd_v1_clip": "clip_keys",
    "detect_sd_variant": "sd_checkpoint",
    "load_sd_checkpoint": "sd_checkpoint",
    "save_sd_checkpoint": "sd_checkpoint",
    "split_sd_state_dict": "sd_checkpoint",
    "diffusers_to_ldm_unet": "unet_keys",
    "ldm_to_diffusers_unet": "unet_keys",
    "unet_config_from_diffusers": "unet_keys",
    "unet_config_to_diffusers": "unet_keys",
    "diffusers_to_ldm_vae": "vae_keys",
    "ldm_to_diffusers_vae": "vae_keys",
    "vae_config_from_diffusers": "vae_keys",
    "vae_config_to_diffusers": "vae_keys",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldm.formats.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldm.formats' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
