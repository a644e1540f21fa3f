"""Model formats: every reader and writer of a whole model, the LoRA file formats and the key maps between our
module names and diffusers' / the original Stable Diffusion checkpoints'.

Every reader returns one :class:`ModelComponents` (:func:`load_components` picks the reader for a path) and
:func:`save_components` writes one in any format. Depends on ``ldm.nn`` and ``ldm.diffusion`` (and
transformers/safetensors); diffusers is never imported.
"""

from ldm.formats.clip_keys import clip_state_prefix, openclip_to_transformers, sd_v1_clip_to_transformers, transformers_to_sd_v1_clip
from ldm.formats.components import ModelComponents
from ldm.formats.diffusers_folder import read_diffusers_folder, read_diffusers_states, read_vae_scaling_factor, write_diffusers_folder
from ldm.formats.ldm_folder import read_ldm_folder, write_pipeline_folder
from ldm.formats.lightning_ckpt import read_lightning_checkpoint
from ldm.formats.load import load_components
from ldm.formats.lora_files import load_lora, save_lora
from ldm.formats.save import save_components
from ldm.formats.sd_checkpoint import detect_sd_variant, load_sd_checkpoint, save_sd_checkpoint, split_sd_state_dict
from ldm.formats.sd_single_file import read_sd_single_file, write_sd_single_file
from ldm.formats.sdxl_single_file import read_sdxl_single_file
from ldm.formats.text_encoder_files import load_text_encoder, new_text_encoder
from ldm.formats.unet_keys import diffusers_to_ldm_unet, ldm_to_diffusers_unet, unet_config_from_diffusers, unet_config_to_diffusers
from ldm.formats.vae_keys import diffusers_to_ldm_vae, ldm_to_diffusers_vae, vae_config_from_diffusers, vae_config_to_diffusers

__all__ = [
    "ModelComponents",
    "clip_state_prefix",
    "detect_sd_variant",
    "diffusers_to_ldm_unet",
    "diffusers_to_ldm_vae",
    "ldm_to_diffusers_unet",
    "ldm_to_diffusers_vae",
    "load_components",
    "load_lora",
    "load_sd_checkpoint",
    "load_text_encoder",
    "new_text_encoder",
    "openclip_to_transformers",
    "read_diffusers_folder",
    "read_diffusers_states",
    "read_ldm_folder",
    "read_lightning_checkpoint",
    "read_sd_single_file",
    "read_sdxl_single_file",
    "read_vae_scaling_factor",
    "save_components",
    "save_lora",
    "save_sd_checkpoint",
    "sd_v1_clip_to_transformers",
    "split_sd_state_dict",
    "transformers_to_sd_v1_clip",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "write_diffusers_folder",
    "write_pipeline_folder",
    "write_sd_single_file",
]
