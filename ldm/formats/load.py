"""Load a whole text-to-image model from any layout we read: the parts a pipeline or a fine-tune starts from.

Layouts, detected from the path:

* our exported folder (``model_index.json`` with ``"_class_name": "LatentDiffusionPipeline"``),
* a diffusers Stable Diffusion folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``),
* a Lightning ``.ckpt`` of ``LatentDiffusion`` (EMA weights by default),
* an original SD single file, ``.safetensors`` or ``.ckpt`` (``model.diffusion_model.*`` ...), SD 1.x/2.x or SDXL
  (``conditioner.embedders.*``, read by :mod:`ldm.formats.sdxl_single_file`).

Each has its reader in its format's module; all return :class:`~ldm.formats.components.ModelComponents`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.diffusion import normalize_prediction_type
from ldm.formats.components import ModelComponents
from ldm.formats.config_files import read_json_config
from ldm.formats.diffusers_folder import read_diffusers_folder
from ldm.formats.ldm_folder import read_ldm_folder
from ldm.formats.lightning_ckpt import read_lightning_checkpoint
from ldm.formats.sd_checkpoint import is_sdxl_checkpoint, load_sd_checkpoint
from ldm.formats.sd_single_file import read_sd_parts
from ldm.formats.sdxl_single_file import read_sdxl_parts
from ldm.nn.configs import ConfigError

__all__ = ["load_components"]


def load_components(path: str | Path, use_ema: bool = True, prediction_type: str | None = None,
                    tokenizer: str | Path | None = None, num_heads: int | None = None,
                    num_head_channels: int | None = None, vae_encoder: bool = True) -> ModelComponents:
    """Load the model at ``path`` in whichever layout it is (see the module docstring).

    Args:
        path: Folder, Lightning ``.ckpt`` or SD single file.
        use_ema: EMA weights of a Lightning checkpoint or an SD file (``model_ema.*``) when present.
        prediction_type: Override the stored prediction type (needed for SD 2.x 768-v single files,
            whose weights cannot tell; for those it also sets the default sample size).
        tokenizer: Tokenizer folder or hub id for an SD single file (which holds none); for SDXL a folder with
            ``tokenizer/`` and ``tokenizer_2/`` (a diffusers copy of the model).
        num_heads: UNet attention heads of an SD single file (shapes cannot tell them; see
            :func:`~ldm.formats.sd_single_file.read_sd_single_file`; SDXL:
            :func:`~ldm.formats.sdxl_single_file.read_sdxl_single_file`).
        num_head_channels: Channels per UNet attention head of an SD single file (instead of ``num_heads``).
        vae_encoder: False builds the VAE without its encoder (training from precomputed latents): its weights are
            read only to hash them (``vae.encoder_fingerprint()``) and are then dropped.

    Raises:
        FileNotFoundError: when ``path`` is none of the layouts.
        ValueError: for an unknown checkpoint layout or weights that do not fit, naming the keys; for head
            counts given for a layout that stores its own; (``ConfigError``) for invalid JSON or a config value of
            the wrong type, out of range or missing, naming the file and the key.
    """
    path = Path(path)
    source = str(path)  # where the sample size was recorded
    if path.is_file() and path.suffix in (".ckpt", ".safetensors", ".pt", ".pth"):
        parts = _from_file(path, use_ema, tokenizer, prediction_type, num_heads, num_head_channels, vae_encoder)
    elif (path / "model_index.json").is_file():
        _no_head_override(path, num_heads, num_head_channels)
        index_path = path / "model_index.json"
        kind = read_json_config(index_path).get("_class_name")
        if kind == "LatentDiffusionPipeline":
            parts, source = read_ldm_folder(path, vae_encoder), str(index_path)
        elif isinstance(kind, str) and kind.startswith("StableDiffusion"):
            parts, source = read_diffusers_folder(path, vae_encoder), str(path / "unet" / "config.json")
        else:
            raise ConfigError("_class_name", f"got {kind!r}; expected 'LatentDiffusionPipeline' (ldm's export) or a "
                              "diffusers Stable Diffusion pipeline ('StableDiffusionPipeline', ...)", str(index_path))
    else:
        raise FileNotFoundError(
            f"{path} is not a model: expected a folder with model_index.json (ldm's export or a diffusers Stable Diffusion "
            "folder), a Lightning .ckpt of LatentDiffusion, or an original SD single file (.safetensors/.ckpt)"
        )
    if prediction_type is not None:
        parts.prediction_type = normalize_prediction_type(prediction_type)
    factor = parts.vae.downsampling_factor * parts.unet.downsampling_factor
    if parts.sample_size is not None and parts.sample_size % factor:
        raise ConfigError("sample_size", f"{parts.sample_size} pixels is not a multiple of {factor} (the VAE's and "
                          "UNet's downsampling together), so the model cannot generate its own default size", source)
    return parts


def _no_head_override(path: Path, num_heads: int | None, num_head_channels: int | None) -> None:
    if num_heads is not None or num_head_channels is not None:
        raise ValueError(f"num_heads/num_head_channels apply to SD single files, whose weights cannot tell them; {path} "
                         "stores its UNet config (heads included), so leave them out")


def _from_file(path: Path, use_ema: bool, tokenizer: str | Path | None, prediction_type: str | None,
               num_heads: int | None, num_head_channels: int | None, vae_encoder: bool) -> ModelComponents:
    if path.suffix != ".safetensors":
        # mmap: telling a Lightning checkpoint from an SD .ckpt does not read the whole file. Files this cannot
        # read (legacy format, unsafe pickles) go on to the SD reader, which explains what is wrong.
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001
            ckpt = None
        if isinstance(ckpt, dict) and "unet" in ckpt.get("hyper_parameters", {}):
            _no_head_override(path, num_heads, num_head_channels)
            return read_lightning_checkpoint(path, ckpt, load_components, use_ema, vae_encoder)
        del ckpt
    parts = load_sd_checkpoint(path, use_ema=use_ema)  # read once, then SD 1.x/2.x or SDXL
    read = read_sdxl_parts if is_sdxl_checkpoint(parts) else read_sd_parts
    return read(path, parts, prediction_type=prediction_type, tokenizer=tokenizer, num_heads=num_heads,
                num_head_channels=num_head_channels, vae_encoder=vae_encoder)
