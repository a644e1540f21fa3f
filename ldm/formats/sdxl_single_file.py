"""SDXL original single files (Stability's SGM layout, what SD UIs load): detect one, read it as a whole model, write one.

Layout (that of ``sd_xl_base_1.0.safetensors``):

* ``model.diffusion_model.*``: the UNet in our ``UNetModel`` names, its vector conditioning under ``label_emb.0.*``;
* ``first_stage_model.*``: the VAE, as in SD 1.x/2.x files;
* ``conditioner.embedders.0.transformer.*``: CLIP ViT-L, a transformers ``CLIPTextModel`` as SD 1.x stores it
  (``text_model.*`` keys);
* ``conditioner.embedders.1.model.*``: OpenCLIP ViT-bigG, as SD 2.x stores its text tower, plus ``text_projection``
  (``(width, projection)``, applied as ``x @ text_projection``) that gives the pooled embedding.

Reading (:func:`read_sdxl_single_file`; :func:`~ldm.formats.sd_single_file.read_sd_single_file` hands SDXL files
here) infers the UNet config from the weights (per-level transformer depth, the middle depth, ``adm_in_channels``;
SGM's 64-channel heads; each size/crop id's embedding width from ``adm_in_channels`` minus the pooled width, over
6: SGM's 256) and the CLIP configs from their shapes (ViT-L ``quick_gelu``, bigG ``gelu``, both 64-channel heads).
Both encoders are read at the penultimate hidden states without the final norm, as SGM and diffusers do. What
weights cannot tell comes from the arguments, else from the ``ldm.model`` header entry our writer leaves (exact
configs, schedule, prediction type, sample size, sampler settings), else from SDXL base's defaults: epsilon
prediction (``v_prediction`` when the file carries the ``v_pred`` marker key some v-prediction fine-tunes hold), SD's
scaled-linear schedule, latent scale 0.13025, 1024 pixels, zero embeddings for an empty negative prompt.

Tokenizers: a file holds none. Ours carry both in the header (``ldm.tokenizer``, ``ldm.tokenizer_2``); for others
pass ``tokenizer=``: a folder with ``tokenizer/`` (CLIP ViT-L) and ``tokenizer_2/`` (bigG), such as a diffusers copy
of SDXL, or a hub id with those subfolders (default ``stabilityai/stable-diffusion-xl-base-1.0``, when reachable).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.diffusion.schedule import NoiseSchedule
from ldm.formats.clip_keys import (clip_config_from_state, openclip_to_transformers_with_projection,
                                   sd_v1_clip_to_transformers, transformers_to_sd_v1_clip,
                                   transformers_with_projection_to_openclip)
from ldm.formats.components import ModelComponents
from ldm.formats.config_files import (ScheduleConfig, check_prediction_type, check_sample_size, check_scaling_factor,
                                      parse_json_config, sampler_config_from)
from ldm.formats.diffusers_folder import check_sdxl_conditioning
from ldm.formats.sd_checkpoint import (CONDITIONER_PREFIX, UNET_PREFIX, VAE_PREFIX, _contiguous_unshared, detect_sd_variant,
                                      is_sdxl_checkpoint, load_sd_checkpoint)
from ldm.formats.sd_single_file import (META_KEY, SD_SAMPLER, TOKENIZER_KEY, _head_settings, _load_strict, _meta_source,
                                        _read_metadata, _stored_config, read_header_metadata, read_unet_part, read_vae_part,
                                        text_config_record, tokenizer_files, tokenizer_from_files)
from ldm.formats.text_encoder_files import _looks_local, check_clip_text_config, load_clip_tokenizer
from ldm.nn.configs import ConfigError
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.text_encoder import LAYERS, TextEncoder
from ldm.nn.unet import UNetModel

log = logging.getLogger(__name__)

__all__ = ["is_sdxl_checkpoint", "read_sdxl_single_file", "read_sdxl_parts", "sdxl_checkpoint_state", "sdxl_text_states",
           "sdxl_unet_config_from_state", "write_sdxl_single_file"]

CLIP_L_PREFIX = "conditioner.embedders.0."  # + transformer.text_model.*
BIGG_PREFIX = "conditioner.embedders.1."  # + model.*
TOKENIZER_2_KEY = "ldm.tokenizer_2"
SDXL_SCALING_FACTOR = 0.13025
SDXL_SAMPLE_SIZE = 1024
SGM_TIME_EMBED_DIM = 256  # SGM's width of each size/crop id's sinusoidal embedding
SIZE_IDS = 6  # original size, crop top-left, target size: two numbers each
DEFAULT_SDXL_TOKENIZERS = "stabilityai/stable-diffusion-xl-base-1.0"
V_PRED_MARKER = "v_pred"  # an empty tensor some v-prediction SDXL fine-tunes carry (ComfyUI's convention)
_FIX = ("use a complete SDXL base checkpoint (UNet, VAE and both text encoders), or load a diffusers copy of the "
        "model (a folder with text_encoder/ and text_encoder_2/)")


def _text_parts(other: dict[str, torch.Tensor], path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The two encoders' raw weights: CLIP ViT-L as ``transformer.text_model.*``, bigG as ``model.*``."""
    first = {k[len(CLIP_L_PREFIX):]: v for k, v in other.items() if k.startswith(CLIP_L_PREFIX + "transformer.")}
    second = {k[len(BIGG_PREFIX):]: v for k, v in other.items() if k.startswith(BIGG_PREFIX + "model.")}
    if not first and any(k.startswith(CLIP_L_PREFIX + "model.") for k in other):
        raise ValueError(f"{path} looks like an SDXL refiner (only OpenCLIP bigG, under conditioner.embedders.0.model.); "
                         f"ldm reads SDXL base files with both text encoders: {_FIX}")
    if not first or not second:
        clip_l, big_g = "CLIP ViT-L (conditioner.embedders.0.transformer.*)", "OpenCLIP bigG (conditioner.embedders.1.model.*)"
        if first or second:
            has, lacks = (clip_l, big_g) if first else (big_g, clip_l)
            what = f"holds only SDXL's {has}; {lacks} is missing"
        else:
            what = f"has an SDXL UNet (label_emb) but no text encoders: {clip_l} and {big_g} are missing"
        raise ValueError(f"{path} {what}, and an SDXL model needs both to generate from text: {_FIX}")
    odd = sorted(k for k in other if k.startswith(CONDITIONER_PREFIX)
                 and not k.startswith((CLIP_L_PREFIX + "transformer.", BIGG_PREFIX + "model.")))
    if odd:
        raise ValueError(f"{path}: unknown conditioner weights {odd[:5]} ({len(odd)} in all); expected CLIP ViT-L under "
                         "conditioner.embedders.0.transformer.* and OpenCLIP bigG under conditioner.embedders.1.model.*")
    return first, second


def sdxl_text_states(other: dict[str, torch.Tensor], path: Path | str = "the checkpoint"
                     ) -> tuple[tuple[dict[str, torch.Tensor], CLIPTextConfig], tuple[dict[str, torch.Tensor], CLIPTextConfig]]:
    """Both text encoders of an SDXL single file (the ``other`` part of its split, prefixes kept) as transformers
    weights with the configs their shapes give: ``((CLIPTextModel state, config), (CLIPTextModelWithProjection state,
    config))``. Works on the meta device.

    Raises:
        ValueError: naming ``path``, when an encoder is missing or its keys are not of the expected layout.
    """
    first, second = _text_parts(other, path)
    try:
        first_state = sd_v1_clip_to_transformers(first)
        first_config = clip_config_from_state(first_state, hidden_act="quick_gelu")
    except KeyError as error:
        raise ValueError(f"{path}: unknown CLIP ViT-L layout under {CLIP_L_PREFIX}: {error.args[0]}") from None
    try:
        second_state, second_config = openclip_to_transformers_with_projection(second)
    except KeyError as error:
        raise ValueError(f"{path}: unknown OpenCLIP bigG layout under {BIGG_PREFIX}model.: {error.args[0]}") from None
    return (first_state, first_config), (second_state, second_config)


def sdxl_unet_config_from_state(unet: dict[str, torch.Tensor], pooled_size: int | None = None,
                                path: Path | str = "the checkpoint") -> dict[str, Any]:
    """The ``UNetModel`` config an SDXL UNet's weights (``model.diffusion_model.*``, prefix optional) give, with SGM's
    64-channel heads. ``pooled_size`` (the second text encoder's projection width) gives each size/crop id's
    embedding width as ``(adm_in_channels - pooled_size) / 6``; without it, SGM's 256.

    Raises:
        ValueError: naming ``path`` for a UNet without vector conditioning or whose ``adm_in_channels`` does not
            split into the pooled embedding and 6 ids; for an unknown layout, listing keys.
    """
    config = detect_sd_variant(unet, addition_time_embed_dim=SGM_TIME_EMBED_DIM)["unet_config"]
    adm = config.get("adm_in_channels")
    if adm is None:
        raise ValueError(f"{path}: the UNet has no vector conditioning (label_emb.0.0.weight), which SDXL's pooled text "
                         "embedding and size ids need; this is not an SDXL UNet")
    if pooled_size is not None:
        time_dim, rest = divmod(adm - pooled_size, SIZE_IDS)
        if rest or time_dim < 1:
            raise ValueError(f"{path}: the UNet's vector input has {adm} channels (label_emb.0.0.weight), which is not "
                             f"the pooled text embedding ({pooled_size}) plus {SIZE_IDS} size/crop ids of equal width")
        config["addition_time_embed_dim"] = time_dim
    return config


def _unet(parts: dict[str, Any], stored: dict[str, Any], pooled_size: int, heads: dict[str, int] | None,
          path: Path) -> UNetModel:
    inferred = sdxl_unet_config_from_state(parts["unet"], pooled_size, path)
    return read_unet_part(parts["unet"], inferred, stored, heads, path).eval()


def _tokenizer_header(path: Path) -> dict[str, str]:
    text = read_header_metadata(path).get(TOKENIZER_2_KEY)
    files = {} if text is None else parse_json_config(text, _meta_source(path, TOKENIZER_2_KEY))
    if any(not isinstance(v, str) for v in files.values()):
        raise ConfigError(next(k for k, v in files.items() if not isinstance(v, str)),
                          "expected the tokenizer file's text (a string)", _meta_source(path, TOKENIZER_2_KEY))
    return files


def _tokenizers(explicit: str | Path | None, stored: tuple[dict[str, str], dict[str, str]],
                path: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """``explicit`` (a folder or hub id with ``tokenizer/`` and ``tokenizer_2/``), else the header's, else the hub's."""
    if explicit is None and all(stored):
        return tokenizer_from_files(stored[0]), tokenizer_from_files(stored[1])
    name = str(DEFAULT_SDXL_TOKENIZERS if explicit is None else explicit)
    fix = ("Pass tokenizer= (Python) or --tokenizer (CLI): a folder with tokenizer/ (CLIP ViT-L) and tokenizer_2/ "
           "(OpenCLIP bigG), such as a diffusers copy of SDXL (stabilityai/stable-diffusion-xl-base-1.0)")
    folder = Path(name).expanduser()
    try:
        if folder.is_dir():
            missing = [sub for sub in ("tokenizer", "tokenizer_2") if not (folder / sub).is_dir()]
            if missing:
                raise FileNotFoundError(f"{folder} has no {' or '.join(s + '/' for s in missing)}")
            return load_clip_tokenizer(folder / "tokenizer"), load_clip_tokenizer(folder / "tokenizer_2")
        if _looks_local(name):
            raise FileNotFoundError(f"tokenizer path {name!r} does not exist")
        return (CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
                CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2"))
    except OSError as error:  # FileNotFoundError included; a hub id offline
        raise OSError(f"{path} is an SDXL single file and holds no tokenizers; {name!r} gave none ({error}). {fix}.") from error


def _text_encoders(states: Any, stored: dict[str, Any], layer: str | None,
                   tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], path: Path) -> DualTextEncoder:
    """Both encoders from :func:`sdxl_text_states`' weights and configs (the header's configs win)."""
    (first_state, first_config), (second_state, second_config) = states
    configs = [first_config, second_config]
    for i, key in enumerate(("text_encoder", "text_encoder_2")):
        if key in stored:
            check_clip_text_config(stored[key], _meta_source(path), key)
            configs[i] = CLIPTextConfig(**stored[key])
    first, second = CLIPTextModel(configs[0]), CLIPTextModelWithProjection(configs[1])
    _load_strict(first, first_state, f"text encoder (CLIP ViT-L, {CLIP_L_PREFIX}*)", path)
    _load_strict(second, second_state, f"text encoder 2 (OpenCLIP bigG, {BIGG_PREFIX}*)", path)
    layers = []
    for key in ("text_encoder_layer", "text_encoder_2_layer"):
        value = layer or stored.get(key) or "penultimate_raw"
        if value not in LAYERS:
            raise ConfigError(key, f"got {value!r}; expected one of {', '.join(LAYERS)}", _meta_source(path))
        layers.append(value)
    positions = min(c.max_position_embeddings for c in configs)
    length = stored.get("text_encoder_max_length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= positions):
        raise ConfigError("text_encoder_max_length", f"got {length!r}; expected an integer from 2 to {positions}",
                          _meta_source(path))
    length = length or min(int(tokenizers[0].model_max_length), positions)
    return DualTextEncoder(TextEncoder(first, tokenizers[0], layer=layers[0], max_length=length).eval(),
                           TextEncoder(second, tokenizers[1], layer=layers[1], max_length=length).eval())


def read_sdxl_parts(path: str | Path, parts: dict[str, Any], prediction_type: str | None = None,
                    tokenizer: str | Path | None = None, text_encoder_layer: str | None = None,
                    num_heads: int | None = None, num_head_channels: int | None = None,
                    vae_encoder: bool = True) -> ModelComponents:
    """Build the model of an SDXL single file already read and split (:func:`~ldm.formats.sd_checkpoint.load_sd_checkpoint`);
    the arguments are :func:`read_sdxl_single_file`'s."""
    path = Path(path)
    stored, stored_tokenizer = _read_metadata(path)
    meta = _meta_source(path)
    if not parts["unet"]:
        raise ValueError(f"{path} has no UNet weights (model.diffusion_model.*): {_FIX}")
    states = sdxl_text_states(parts["other"], path)  # a file lacking an encoder is refused before tokenizers are sought
    tokenizers = _tokenizers(tokenizer, (stored_tokenizer, _tokenizer_header(path)), path)
    text_encoder = _text_encoders(states, stored, text_encoder_layer, tokenizers, path)
    heads = _head_settings(num_heads, num_head_channels, "the arguments")
    unet = _unet(parts, stored, text_encoder.pooled_size, heads, path)
    check_sdxl_conditioning(unet.config, text_encoder, f"{path} (UNet vs text encoders)")
    vae = read_vae_part(parts["vae"], stored, path, vae_encoder)
    ignored = sorted(k for k in parts["other"] if not k.startswith(CONDITIONER_PREFIX) and k != V_PRED_MARKER)
    if ignored:
        log.warning("%s: ignored %d tensors outside the UNet, VAE and text encoders, e.g. %s", path, len(ignored), ignored[:3])

    if prediction_type is not None:
        prediction = check_prediction_type(prediction_type, "the arguments")
    elif stored.get("prediction_type") is not None:
        prediction = check_prediction_type(stored["prediction_type"], meta)
    else:
        prediction = "v_prediction" if V_PRED_MARKER in parts["other"] else "epsilon"
    noise = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    if stored.get("schedule") is not None:
        noise = _stored_config(ScheduleConfig, stored, "schedule", {}, path).build()
    scaling = SDXL_SCALING_FACTOR if stored.get("scaling_factor") is None else check_scaling_factor(stored["scaling_factor"], meta)
    sample_size = check_sample_size(stored.get("sample_size"), meta) or SDXL_SAMPLE_SIZE
    force_zeros = stored.get("force_zeros_for_empty_prompt", True)
    if not isinstance(force_zeros, bool):
        raise ConfigError("force_zeros_for_empty_prompt", f"got {force_zeros!r}; expected true or false", meta)
    sampler = sampler_config_from(stored, meta, noise.num_timesteps, **SD_SAMPLER.to_dict())
    return ModelComponents(unet, vae.eval(), text_encoder, noise, prediction, scaling, sample_size, sampler,
                           variant="xl", force_zeros_for_empty_prompt=force_zeros)


def read_sdxl_single_file(path: str | Path, use_ema: bool = True, prediction_type: str | None = None,
                          tokenizer: str | Path | None = None, text_encoder_layer: str | None = None,
                          num_heads: int | None = None, num_head_channels: int | None = None,
                          vae_encoder: bool = True) -> ModelComponents:
    """Build a whole SDXL model from an SGM-layout single file (``.safetensors``, or ``.ckpt`` read with
    ``weights_only=True``); see the module docstring for what comes from where.

    Args:
        path: The checkpoint.
        use_ema: The UNet's ``model_ema.*`` weights when the file has them.
        prediction_type: ``epsilon`` or ``v_prediction``; ``None``: the header's, else the ``v_pred`` marker, else epsilon.
        tokenizer: A folder (or hub id) with ``tokenizer/`` and ``tokenizer_2/``; needed for files we did not write.
        text_encoder_layer: The hidden layer both encoders are read at; ``None``: ``penultimate_raw`` (SDXL's).
        num_heads: UNet attention heads, overriding SGM's 64-channel heads (shapes cannot tell them).
        num_head_channels: Channels per UNet attention head instead.
        vae_encoder: False builds the VAE without its encoder.

    Raises:
        FileNotFoundError: if the file does not exist.
        OSError: when no tokenizers can be found, naming the fix.
        ValueError: naming the file, for a file that is not a whole SDXL base model (one text encoder only, a
            refiner, no UNet or VAE) or weights that do not fit.
    """
    path = Path(path)
    parts = load_sd_checkpoint(path, use_ema=use_ema)
    if not is_sdxl_checkpoint(parts):
        raise ValueError(f"{path} is not an SDXL file (no conditioner.embedders.* text encoders, no label_emb in the "
                         "UNet); read SD 1.x/2.x files with read_sd_single_file")
    return read_sdxl_parts(path, parts, prediction_type, tokenizer, text_encoder_layer, num_heads, num_head_channels,
                           vae_encoder)


def sdxl_checkpoint_state(unet_state: dict[str, torch.Tensor], vae_state: dict[str, torch.Tensor],
                          text_encoder_state: dict[str, torch.Tensor],
                          text_encoder_2_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an SDXL single file: our UNet and VAE state dicts, a ``CLIPTextModel``'s (CLIP ViT-L) and a
    ``CLIPTextModelWithProjection``'s (bigG) under SGM's names. Works on the meta device."""
    tensors = {UNET_PREFIX + k: v for k, v in unet_state.items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae_state.items()})
    tensors.update({CLIP_L_PREFIX + k: v for k, v in transformers_to_sd_v1_clip(text_encoder_state).items()})
    tensors.update({BIGG_PREFIX + k: v for k, v in transformers_with_projection_to_openclip(text_encoder_2_state).items()})
    return tensors


def write_sdxl_single_file(path: str | Path, parts: ModelComponents, sample_size: int) -> Path:
    """Write an SDXL model as an SGM-layout ``.safetensors`` single file, with the ``ldm.model`` header entry (exact
    configs, both encoders' layers, schedule, prediction type, scale, sample size, sampler settings,
    ``force_zeros_for_empty_prompt``) and both tokenizers (``ldm.tokenizer``, ``ldm.tokenizer_2``), so that
    :func:`read_sdxl_single_file` rebuilds the very same model without arguments.

    Raises:
        ValueError: for a model that is not SDXL-shaped or a path not ending in ``.safetensors``.
    """
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"an SDXL single file is written as .safetensors; got {out.name}")
    if not parts.is_sdxl:
        raise ValueError("write_sdxl_single_file needs an SDXL model (two text encoders); use write_sd_single_file")
    first, second = parts.text_encoder.encoders
    tensors = sdxl_checkpoint_state(parts.unet.state_dict(), parts.vae.state_dict(), first.model.state_dict(),
                                    second.model.state_dict())
    meta = {
        "unet": parts.unet_config.to_dict(),
        "vae": parts.vae_config.to_dict(),
        "text_encoder": text_config_record(first.model),
        "text_encoder_2": text_config_record(second.model),
        "text_encoder_layer": first.layer,
        "text_encoder_2_layer": second.layer,
        "text_encoder_max_length": parts.text_encoder.max_length,
        "schedule": parts.schedule.to_config(),
        "prediction_type": parts.prediction_type,
        "scaling_factor": float(parts.scaling_factor),
        "sample_size": int(sample_size),
        "force_zeros_for_empty_prompt": bool(parts.force_zeros_for_empty_prompt),
        **parts.sampler_config.to_dict(),
    }
    header = {"format": "pt", META_KEY: json.dumps(meta, default=list),
              TOKENIZER_KEY: json.dumps(tokenizer_files(first.tokenizer)),
              TOKENIZER_2_KEY: json.dumps(tokenizer_files(second.tokenizer))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous_unshared(tensors), str(out), metadata=header)
    return out
