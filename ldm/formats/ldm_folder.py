"""Our model folders: ``config.json`` + safetensors files (one model), and the pipeline folder that holds them.

A model folder holds the constructor arguments (``config.json``, plus any extra values the model
measured, such as the latent scaling factor) and one or more ``*.safetensors`` weight files. Loading
never executes code from the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.diffusion import NoiseSchedule, SamplerConfig
from ldm.formats.weights import load_checked
from ldm.formats.components import ModelComponents
from ldm.formats.text_encoder_files import load_text_encoder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig
from ldm.nn.unet import UNetModel

CONFIG_NAME = "config.json"
VAE_WEIGHTS = "model.safetensors"  # the weights file of a model folder (the autoencoder's, the UNet's)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def write_model_folder(path: str | Path, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``config.json`` and one safetensors file per entry of ``weights`` (file name -> state dict)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / file_name))
    (folder / CONFIG_NAME).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n")
    return folder


def read_model_folder(path: str | Path, expected_class: str) -> tuple[dict[str, Any], Path]:
    """Read and check ``config.json``; returns the config and the folder."""
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder: {CONFIG_NAME} is missing. Pass a folder written by save_pretrained()."
        )
    config = json.loads(config_path.read_text())
    found = config.get("_class_name")
    if found != expected_class:
        raise ValueError(f"{config_path} describes a {found!r}, not a {expected_class!r}.")
    return config, folder


def load_weights(folder: Path, file_name: str) -> dict[str, torch.Tensor]:
    """Load one safetensors file of a model folder, with a clear error when it is missing."""
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the model folder is incomplete.")
    return load_file(str(path))


def write_pipeline_folder(
    path: str | Path,
    unet_config: dict[str, Any],
    unet_state: dict[str, torch.Tensor],
    vae_config: dict[str, Any],
    vae_state: dict[str, torch.Tensor],
    text_encoder,
    schedule_config: dict[str, Any],
    prediction_type: str,
    sample_size: int,
    sampler_config: SamplerConfig,
) -> Path:
    """Write a text-to-image model folder: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/`` and ``scheduler/`` (safetensors and JSON only; the diffusers folder layout). The scheduler's
    JSON holds the noise schedule, the prediction type and the sampler settings (:class:`SamplerConfig`)."""
    folder = Path(path)
    write_model_folder(folder / "unet", {**unet_config, "_class_name": "UNetModel"}, {"model.safetensors": unet_state})
    write_model_folder(folder / "vae", {**vae_config, "_class_name": "AutoencoderKL"}, {"model.safetensors": vae_state})
    text_encoder.save_pretrained(folder)
    scheduler = {**schedule_config, **sampler_config.to_dict(), "_class_name": "NoiseSchedule", "prediction_type": prediction_type}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_jsonable(scheduler), indent=2) + "\n")
    index = {"_class_name": "LatentDiffusionPipeline", "_ldm_version": 1, "unet": "unet", "vae": "vae",
             "text_encoder": "text_encoder", "tokenizer": "tokenizer", "scheduler": "scheduler",
             "text_encoder_layer": text_encoder.layer, "sample_size": int(sample_size)}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def read_ldm_folder(folder: str | Path, vae_encoder: bool = True) -> ModelComponents:
    """Our exported folder (``model_index.json`` of a ``LatentDiffusionPipeline``) as loaded modules;
    ``vae_encoder=False`` builds the VAE without its encoder."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    unet_config, _ = read_model_folder(folder / "unet", "UNetModel")
    unet_config.pop("_class_name")
    unet = UNetModel(**unet_config)
    load_checked(unet, load_weights(folder / "unet", VAE_WEIGHTS), str(folder / "unet"))
    vae_config, _ = read_model_folder(folder / "vae", "AutoencoderKL")
    vae = KLAutoencoder(AutoencoderConfig.from_dict(vae_config), with_encoder=vae_encoder)
    load_checked(vae, load_weights(folder / "vae", VAE_WEIGHTS), str(folder / "vae"))
    text_encoder = load_text_encoder(folder, layer=index.get("text_encoder_layer"))
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    prediction_type = sched.pop("prediction_type", "epsilon")
    sched.pop("_class_name", None)
    sampler_config, sched = SamplerConfig.split(sched)
    return ModelComponents(unet.eval(), vae.eval(), text_encoder, NoiseSchedule.from_config(sched), prediction_type,
                           vae_config.get("scaling_factor", 1.0), index.get("sample_size") or vae_config.get("resolution"),
                           sampler_config)  # no sample_size (old exports): the VAE's training size
