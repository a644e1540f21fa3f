"""Load a whole text-to-image model from any layout we read: the parts a pipeline or a fine-tune starts from.

Layouts, detected from the path:

* our exported folder (``model_index.json`` with ``"_class_name": "LatentDiffusionPipeline"``),
* a diffusers Stable Diffusion folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``),
* a Lightning ``.ckpt`` of :class:`~ldm.models.latent_diffusion.LatentDiffusion` (EMA weights by default),
* an original SD single file, ``.safetensors`` or ``.ckpt`` (``model.diffusion_model.*`` ...).

``interop`` depends on ``nn`` only, so this module (``models``) may use it without a cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.diffusion import NoiseSchedule, SamplerConfig, normalize_prediction_type
from ldm.formats.ldm_folder import VAE_WEIGHTS, load_weights, read_model_folder
from ldm.formats.text_encoder_files import load_text_encoder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel


@dataclass
class ModelComponents:
    """A loaded model: modules (eval mode, fp32, CPU), their configs, the schedule and how to use them."""

    unet: UNetModel
    vae: KLAutoencoder
    text_encoder: TextEncoder
    schedule: NoiseSchedule
    prediction_type: str
    scaling_factor: float
    sample_size: int | None
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    sampler_config: SamplerConfig = SamplerConfig()


def load_components(path: str | Path, use_ema: bool = True, prediction_type: str | None = None,
                    tokenizer: str | Path | None = None, num_heads: int | None = None,
                    num_head_channels: int | None = None, vae_encoder: bool = True) -> ModelComponents:
    """Load the model at ``path`` in whichever layout it is (see the module docstring).

    Args:
        path: Folder, Lightning ``.ckpt`` or SD single file.
        use_ema: EMA weights of a Lightning checkpoint or an SD file (``model_ema.*``) when present.
        prediction_type: Override the stored prediction type (needed for SD 2.x 768-v single files,
            whose weights cannot tell; for those it also sets the default sample size).
        tokenizer: Tokenizer folder or hub id for an SD single file (which holds none).
        num_heads: UNet attention heads of an SD single file (shapes cannot tell them; see
            :func:`~ldm.formats.sd_single_file.read_sd_single_file`).
        num_head_channels: Channels per UNet attention head of an SD single file (instead of ``num_heads``).
        vae_encoder: False builds the VAE without its encoder (training from precomputed latents): its weights are
            read only to hash them (``vae.encoder_fingerprint()``) and are then dropped.

    Raises:
        FileNotFoundError: when ``path`` is none of the layouts.
        ValueError: for an unknown checkpoint layout or weights that do not fit, naming the keys; for head
            counts given for a layout that stores its own.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".ckpt", ".safetensors", ".pt", ".pth"):
        parts = _from_file(path, use_ema, tokenizer, prediction_type, num_heads, num_head_channels, vae_encoder)
    elif (path / "model_index.json").is_file():
        _no_head_override(path, num_heads, num_head_channels)
        index = json.loads((path / "model_index.json").read_text())
        read = _from_folder if index.get("_class_name") == "LatentDiffusionPipeline" else _from_diffusers
        parts = read(path, vae_encoder)
    else:
        raise FileNotFoundError(
            f"{path} is not a model: expected a folder with model_index.json (ldm's export or a diffusers Stable Diffusion "
            "folder), a Lightning .ckpt of LatentDiffusion, or an original SD single file (.safetensors/.ckpt)"
        )
    if prediction_type is not None:
        parts.prediction_type = normalize_prediction_type(prediction_type)
    return parts


def _no_head_override(path: Path, num_heads: int | None, num_head_channels: int | None) -> None:
    if num_heads is not None or num_head_channels is not None:
        raise ValueError(f"num_heads/num_head_channels apply to SD single files, whose weights cannot tell them; {path} "
                         "stores its UNet config (heads included), so leave them out")


def _from_folder(folder: Path, vae_encoder: bool) -> ModelComponents:
    index = json.loads((folder / "model_index.json").read_text())
    unet_config, _ = read_model_folder(folder / "unet", "UNetModel")
    unet_config.pop("_class_name")
    unet = UNetModel(**unet_config)
    unet.load_state_dict(load_weights(folder / "unet", "model.safetensors"))
    vae_config, _ = read_model_folder(folder / "vae", "AutoencoderKL")
    vae = KLAutoencoder(AutoencoderConfig.from_dict(vae_config), with_encoder=vae_encoder)
    vae.load_state_dict(load_weights(folder / "vae", VAE_WEIGHTS))
    text_encoder = load_text_encoder(folder, layer=index.get("text_encoder_layer"))
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    prediction_type = sched.pop("prediction_type", "epsilon")
    sched.pop("_class_name", None)
    sampler_config, sched = SamplerConfig.split(sched)
    return ModelComponents(unet.eval(), vae.eval(), text_encoder, NoiseSchedule.from_config(sched), prediction_type,
                           vae_config.get("scaling_factor", 1.0), index.get("sample_size") or vae_config.get("resolution"),
                           unet_config, vae_config, sampler_config)  # no sample_size (old exports): the VAE's training size


def _from_diffusers(folder: Path, vae_encoder: bool) -> ModelComponents:
    from ldm.formats import load_diffusers_folder, read_vae_scaling_factor

    unet_state, unet_config, vae_state, vae_config, text_path, tok_path, sched = load_diffusers_folder(folder)
    if text_path is None or tok_path is None:
        raise FileNotFoundError(f"{folder} lacks text_encoder/ or tokenizer/; a text-to-image folder needs both")
    unet = UNetModel(**unet_config)
    unet.load_state_dict(unet_state)
    vae = KLAutoencoder(**vae_config, with_encoder=vae_encoder)
    vae.load_state_dict(vae_state)
    # diffusers' SD 2.x folders store the text encoder without its last layer, so "last" is right for all.
    text_encoder = load_text_encoder(folder, layer="last")
    sched = sched or {}
    config = {**vae_config, "scaling_factor": read_vae_scaling_factor(folder)}
    latent_size = json.loads((folder / "unet" / "config.json").read_text()).get("sample_size") or 64
    try:
        sampler_config = SamplerConfig.from_diffusers(sched)
    except ValueError as error:
        raise ValueError(f"{folder / 'scheduler' / 'scheduler_config.json'}: {error}") from error
    return ModelComponents(unet.eval(), vae.eval(), text_encoder, NoiseSchedule.from_diffusers_scheduler_config(sched),
                           sched.get("prediction_type", "epsilon"), config["scaling_factor"],
                           int(latent_size) * vae.downsampling_factor, unet_config, config, sampler_config)


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
            from ldm.formats.lightning_ckpt import read_lightning_checkpoint  # it loads init_from through here

            return read_lightning_checkpoint(path, ckpt, use_ema, vae_encoder)
        del ckpt
    from ldm.formats.sd_single_file import read_sd_single_file

    sd = read_sd_single_file(path, use_ema=use_ema, prediction_type=prediction_type, tokenizer=tokenizer, num_heads=num_heads,
                             num_head_channels=num_head_channels, vae_encoder=vae_encoder)
    schedule = NoiseSchedule.from_config(sd.schedule_config) if sd.schedule_config else NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    return ModelComponents(sd.unet.eval(), sd.vae.eval(), sd.text_encoder, schedule, sd.prediction_type, sd.scaling_factor,
                           sd.sample_size, sd.unet_config, {**sd.vae_config, "scaling_factor": sd.scaling_factor}, sd.sampler_config)
