"""Our model folders: ``config.json`` + safetensors files (one model), and the pipeline folder that holds them.

A model folder holds the constructor arguments (``config.json``, plus any extra values the model
measured, such as the latent scaling factor) and one or more ``*.safetensors`` weight files. Loading
never executes code from the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ldm.diffusion import SamplerConfig
from ldm.formats.config_files import MAX_SAMPLE_SIZE, check_scaling_factor, read_json_config, read_ldm_scheduler
from ldm.formats.weights import check_block_count, check_config_fits, load_checked, read_safetensors
from ldm.formats.components import ModelComponents
from ldm.formats.diffusers_folder import check_sdxl_conditioning
from ldm.formats.text_encoder_files import load_text_encoder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig, Config, ConfigError, UNetConfig, positive
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.text_encoder import LAYERS
from ldm.nn.unet import UNetModel

CONFIG_NAME = "config.json"
VAE_WEIGHTS = "model.safetensors"  # the weights file of a model folder (the autoencoder's, the UNet's)

# The keys of a model folder's config.json that every version of our writers has written, so a folder lacking one
# is damaged, not old. The others have always taken the dataclasses' defaults when left out. An autoencoder folder
# (AutoencoderKL.save_pretrained) always held every AutoencoderKL argument and the scaling factor; the VAE of a
# pipeline folder fine-tuned from an SD single file held the shape inferred from the weights (no norm_groups,
# dropout) and the scaling factor. A UNet folder held the run's unet arguments as given plus the channels the
# VAE and text encoder set.
VAE_REQUIRED = ("in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels",
                "mid_attention", "scaling_factor")
UNET_REQUIRED = ("in_channels", "out_channels", "context_dim")


@dataclass(frozen=True)
class PipelineIndex(Config):
    """The settings of our ``model_index.json`` beyond its sub-folder names.

    Args:
        sample_size: Default image size in pixels (None in exports before it was recorded: the VAE's resolution).
        text_encoder_layer: ``last`` or ``penultimate``; None: the text encoder's recorded layer.
        force_zeros_for_empty_prompt: SDXL: zero embeddings for the unconditional branch without a negative prompt.
    """

    sample_size: int | None = None
    text_encoder_layer: str | None = None
    force_zeros_for_empty_prompt: bool = False

    _RULES = {"sample_size": positive}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_size is not None and self.sample_size > MAX_SAMPLE_SIZE:
            raise ConfigError("sample_size", f"got {self.sample_size}; expected at most {MAX_SAMPLE_SIZE} pixels a side")
        if self.text_encoder_layer is not None and self.text_encoder_layer not in LAYERS:
            raise ConfigError("text_encoder_layer", f"got {self.text_encoder_layer!r}; expected one of {', '.join(LAYERS)}")


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
    """Read and check ``config.json``; returns the config and the folder.

    Raises:
        FileNotFoundError: without ``config.json``.
        ConfigError: for invalid JSON or another class than ``expected_class``, naming the file.
    """
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder: {CONFIG_NAME} is missing. Pass a folder written by save_pretrained()."
        )
    config = read_json_config(config_path)
    found = config.get("_class_name")
    if found != expected_class:
        raise ConfigError("_class_name", f"describes a {found!r}, not a {expected_class!r}", str(config_path))
    return config, folder


def read_vae_folder(path: str | Path, expected_class: str = "AutoencoderKL") -> tuple[AutoencoderConfig, float, dict[str, Any], Path]:
    """An autoencoder folder's checked shape and scaling factor, with its whole ``config.json`` (training settings
    too) and the folder.

    Raises:
        FileNotFoundError: without ``config.json``.
        ConfigError: for a missing key of :data:`VAE_REQUIRED`, a bad value, or a scaling factor that is not a
            finite number > 0, naming the file and the key.
    """
    config, folder = read_model_folder(path, expected_class)
    source = str(folder / CONFIG_NAME)
    vae = AutoencoderConfig.from_dict(config, source, required=VAE_REQUIRED)
    return vae, check_scaling_factor(config["scaling_factor"], source), config, folder


def read_unet_folder(path: str | Path) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """A UNet folder's checked config and its weights, which the config is checked to describe.

    Raises:
        ConfigError: for a missing key of :data:`UNET_REQUIRED` or a bad value, naming the file and the key.
        ValueError: when the weights do not fit the config (naming the keys the config left to defaults).
    """
    config, folder = read_model_folder(path, "UNetModel")
    source = str(folder / CONFIG_NAME)
    unet_config = UNetConfig.from_dict(config, source, required=UNET_REQUIRED)
    state = load_weights(folder, VAE_WEIGHTS)
    defaulted = [f for f in UNetConfig.__dataclass_fields__ if f not in config]
    check_block_count(unet_config.to_dict(), state, source, "num_res_blocks, channel_mult, transformer_depth")
    check_config_fits(lambda: UNetModel(unet_config), state, source, defaulted)
    return unet_config, state


def load_weights(folder: Path, file_name: str) -> dict[str, torch.Tensor]:
    """Load one safetensors file of a model folder, with a clear error when it is missing."""
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the model folder is incomplete.")
    return read_safetensors(path)


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
    force_zeros_for_empty_prompt: bool = False,
) -> Path:
    """Write a text-to-image model folder: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/`` and ``scheduler/`` (safetensors and JSON only; the diffusers folder layout); an SDXL model's
    second encoder goes in ``text_encoder_2/`` and ``tokenizer_2/``. The scheduler's JSON holds the noise schedule,
    the prediction type and the sampler settings (:class:`SamplerConfig`)."""
    folder = Path(path)
    write_model_folder(folder / "unet", {**unet_config, "_class_name": "UNetModel"}, {"model.safetensors": unet_state})
    write_model_folder(folder / "vae", {**vae_config, "_class_name": "AutoencoderKL"}, {"model.safetensors": vae_state})
    text_encoder.save_pretrained(folder)
    scheduler = {**schedule_config, **sampler_config.to_dict(), "_class_name": "NoiseSchedule", "prediction_type": prediction_type}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_jsonable(scheduler), indent=2) + "\n")
    index = {"_class_name": "LatentDiffusionPipeline", "_ldm_version": 1, "unet": "unet", "vae": "vae",
             "text_encoder": "text_encoder", "tokenizer": "tokenizer", "scheduler": "scheduler",
             "sample_size": int(sample_size)}
    if isinstance(text_encoder, DualTextEncoder):  # each encoder's config.json records its layer
        index.update(text_encoder_2="text_encoder_2", tokenizer_2="tokenizer_2",
                     force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
    else:
        index["text_encoder_layer"] = text_encoder.layer
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def read_ldm_folder(folder: str | Path, vae_encoder: bool = True) -> ModelComponents:
    """Our exported folder (``model_index.json`` of a ``LatentDiffusionPipeline``) as loaded modules;
    ``vae_encoder=False`` builds the VAE without its encoder."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = PipelineIndex.from_dict(read_json_config(index_path), str(index_path))
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    schedule, prediction_type, sampler_config = read_ldm_scheduler(read_json_config(scheduler_path), str(scheduler_path))
    vae_config, scaling_factor, vae_raw, _ = read_vae_folder(folder / "vae")
    vae_state = load_weights(folder / "vae", VAE_WEIGHTS)
    check_block_count(vae_config.to_dict(), vae_state, str(folder / "vae" / CONFIG_NAME), "num_res_blocks, ch_mult")
    check_config_fits(lambda: KLAutoencoder(vae_config), vae_state, str(folder / "vae" / CONFIG_NAME),
                      [f for f in AutoencoderConfig.__dataclass_fields__ if f not in vae_raw])
    unet_config, unet_state = read_unet_folder(folder / "unet")
    unet = UNetModel(unet_config)
    load_checked(unet, unet_state, str(folder / "unet"))
    vae = KLAutoencoder(vae_config, with_encoder=vae_encoder)
    load_checked(vae, vae_state, str(folder / "vae"))
    if (folder / "text_encoder_2").is_dir():  # SDXL
        text_encoder = DualTextEncoder(load_text_encoder(folder, layer=index.text_encoder_layer),
                                       load_text_encoder(folder, layer=index.text_encoder_layer, subfolder_model="text_encoder_2",
                                                         subfolder_tokenizer="tokenizer_2", with_projection=True))
        check_sdxl_conditioning(unet_config, text_encoder, str(folder / "unet" / CONFIG_NAME))
    else:
        text_encoder = load_text_encoder(folder, layer=index.text_encoder_layer)
    return ModelComponents(unet.eval(), vae.eval(), text_encoder, schedule, prediction_type, scaling_factor,
                           index.sample_size or vae_config.resolution,  # no sample_size (old exports): the VAE's size
                           sampler_config, force_zeros_for_empty_prompt=index.force_zeros_for_empty_prompt)
