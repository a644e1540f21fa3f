"""Stable Diffusion interop: key maps and configs for diffusers and original single-file checkpoints.

Depends on ``ldm.nn`` (and transformers/safetensors) only; diffusers is never imported.
"""

from ldm.formats.clip_keys import clip_state_prefix, openclip_to_transformers, sd_v1_clip_to_transformers, transformers_to_sd_v1_clip
from ldm.formats.diffusers_folder import load_diffusers_folder, read_vae_scaling_factor, write_diffusers_folder
from ldm.formats.sd_checkpoint import detect_sd_variant, load_sd_checkpoint, save_sd_checkpoint, split_sd_state_dict
from ldm.formats.unet_keys import diffusers_to_ldm_unet, ldm_to_diffusers_unet, unet_config_from_diffusers, unet_config_to_diffusers
from ldm.formats.vae_keys import diffusers_to_ldm_vae, ldm_to_diffusers_vae, vae_config_from_diffusers, vae_config_to_diffusers

__all__ = [
    "clip_state_prefix",
    "detect_sd_variant",
    "diffusers_to_ldm_unet",
    "diffusers_to_ldm_vae",
    "ldm_to_diffusers_unet",
    "ldm_to_diffusers_vae",
    "load_diffusers_folder",
    "load_sd_checkpoint",
    "openclip_to_transformers",
    "read_vae_scaling_factor",
    "save_sd_checkpoint",
    "sd_v1_clip_to_transformers",
    "split_sd_state_dict",
    "transformers_to_sd_v1_clip",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "write_diffusers_folder",
]
