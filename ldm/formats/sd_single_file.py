"""A Stable Diffusion single file as a whole model: build UNet, VAE and text encoder from it, or write one.

Reading (:func:`read_sd_single_file`) works on files from anywhere: the UNet, VAE and CLIP configs are
inferred from tensor shapes (:func:`~ldm.formats.sd_checkpoint.detect_sd_variant`,
:func:`~ldm.formats.vae_keys.vae_config_from_state_dict`, :func:`~ldm.formats.clip_keys.clip_config_from_state`),
the text encoder from its layout (SD v1: OpenAI CLIP, last layer; SD v2: OpenCLIP, penultimate layer).
What shapes cannot tell comes, first to last, from the caller's arguments, from the ``ldm.model``
entry of the safetensors header (written by :func:`write_sd_single_file`: exact configs, schedule,
sampler settings, prediction type, sample size, and the tokenizer files under ``ldm.tokenizer``), from an
original SD config YAML next to the file (``v2-inference-v.yaml`` style: ``parameterization``,
``scale_factor``, ``linear_start``/``linear_end``, the UNet's ``num_heads``/``num_head_channels``), and
finally from SD's defaults (v1: 8 heads; v2: 64-channel heads; the original samplers' conventions: leading
timesteps ``1 + k * T // n``, DDIM's last step to ``alphas_cumprod[0]``). A single file holds no tokenizer: pass
``tokenizer=`` (a local folder) where the SD default (``openai/clip-vit-large-patch14`` for v1,
``stabilityai/stable-diffusion-2-1`` for v2) cannot be downloaded. SDXL files (SGM layout) are read and written by
:mod:`ldm.formats.sdxl_single_file`, which builds on the helpers here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.diffusion.sampler_config import SamplerConfig
from ldm.diffusion.schedule import NoiseSchedule
from ldm.formats.config_files import (ScheduleConfig, check_prediction_type, check_sample_size, check_scaling_factor,
                                      parse_json_config, sampler_config_from)
from ldm.formats.weights import load_checked, open_safetensors
from ldm.formats.components import ModelComponents
from ldm.formats.clip_keys import (
    clip_config_from_state,
    openclip_to_transformers,
    sd_v1_clip_to_transformers,
    transformers_to_openclip,
    transformers_to_sd_v1_clip,
)
from ldm.formats.sd_checkpoint import detect_sd_variant, is_sdxl_checkpoint, load_sd_checkpoint, save_sd_checkpoint
from ldm.formats.text_encoder_files import check_clip_text_config, load_clip_tokenizer
from ldm.formats.vae_keys import vae_config_from_state_dict
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig, Config, ConfigError, UNetConfig
from ldm.nn.text_encoder import LAYERS, TextEncoder
from ldm.nn.unet import UNetModel

log = logging.getLogger(__name__)

META_KEY = "ldm.model"
TOKENIZER_KEY = "ldm.tokenizer"
SD_SCALING_FACTOR = 0.18215
DEFAULT_TOKENIZERS = {"v1": "openai/clip-vit-large-patch14", "v2": "stabilityai/stable-diffusion-2-1"}
# The original samplers: DDIM visits t = 1 + k * T // n and steps from the last one to alphas_cumprod[0].
SD_SAMPLER = SamplerConfig(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
_C = TypeVar("_C", bound=Config)


def read_header_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (empty for other files)."""
    if path.suffix != ".safetensors":
        return {}
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _sidecar_yaml(path: Path) -> dict[str, Any]:
    """``model.params`` of an original SD config YAML beside the checkpoint (``x.safetensors`` -> ``x.yaml``)."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text())
        params = dict(config["model"]["params"])
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise ValueError(f"{yaml_path} is not an SD config YAML (model.params): {error}") from error
    log.info("read %s next to the checkpoint", yaml_path)
    return params


def _head_settings(num_heads: int | None, num_head_channels: int | None, what: str) -> dict[str, int] | None:
    """UNet head settings as the original ``UNetModel`` reads them: the one left out is -1 (unused)."""
    if num_heads is None and num_head_channels is None:
        return None
    for name, value in (("num_heads", num_heads), ("num_head_channels", num_head_channels)):
        if value is not None and (not isinstance(value, int) or (value <= 0 and value != -1)):
            raise ValueError(f"{name}={value!r} from {what} must be a positive integer (or -1: unused)")
    heads = {"num_heads": -1 if num_heads is None else num_heads,
             "num_head_channels": -1 if num_head_channels is None else num_head_channels}
    if heads["num_heads"] == -1 and heads["num_head_channels"] == -1:
        raise ValueError(f"{what} sets neither num_heads nor num_head_channels to a positive value")
    return heads


def _yaml_heads(sidecar: dict[str, Any], path: Path) -> dict[str, int] | None:
    """``num_heads``/``num_head_channels`` of ``model.params.unet_config.params`` in a sidecar SD YAML."""
    unet = (sidecar.get("unet_config") or {}).get("params") or {}
    return _head_settings(unet.get("num_heads"), unet.get("num_head_channels"), f"{path.with_suffix('.yaml')} (unet_config.params)")


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    expected.update({k: shape for k, (shape, _) in getattr(module, "encoder_state_spec", {}).items()})  # a VAE without encoder
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v)}" for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: the {what} weights do not fit the inferred model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]} ({len(missing)}/{len(unexpected)}/{len(wrong)} in all)"
        )
    load_checked(module, state, f"{path} ({what})")


def _read_metadata(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``ldm.model`` and ``ldm.tokenizer`` entries of the header (empty dicts when absent), parsed.

    Raises:
        ConfigError: for invalid JSON or JSON that is not an object (of file name -> text for the tokenizer).
    """
    header = read_header_metadata(path)
    stored, tokenizer = ({} if key not in header else parse_json_config(header[key], _meta_source(path, key))
                         for key in (META_KEY, TOKENIZER_KEY))
    bad = [name for name, text in tokenizer.items() if not isinstance(text, str)]
    if bad:
        raise ConfigError(bad[0], "expected the tokenizer file's text (a string)", _meta_source(path, TOKENIZER_KEY))
    return stored, tokenizer


def _meta_source(path: Path, key: str = META_KEY) -> str:
    return f"{path} (safetensors header {key})"


def _stored_config(cls: type[_C], stored: dict[str, Any], key: str, inferred: dict[str, Any], path: Path) -> _C:
    """``stored[key]`` as ``cls``, with the values inferred from the weights for what it leaves out (exports before
    the configs were complete); errors name the header entry and the key."""
    values = stored[key]
    if isinstance(values, dict):
        values = {**inferred, **values}
    try:
        return cls.from_dict(values)
    except ConfigError as error:
        raise error.located(_meta_source(path), prefix=key) from None


def tokenizer_from_files(files: dict[str, str]) -> CLIPTokenizer:
    """A CLIP tokenizer from its files' texts (name -> text), as :func:`tokenizer_files` recorded them."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def _tokenizer(explicit: str | Path | None, stored: dict[str, str], version: str) -> CLIPTokenizer:
    if explicit is not None:
        return load_clip_tokenizer(explicit)
    if stored:
        return tokenizer_from_files(stored)
    name = DEFAULT_TOKENIZERS[version]
    try:
        return load_clip_tokenizer(name)
    except OSError as error:
        raise OSError(
            f"an SD single file holds no tokenizer and {name!r} could not be loaded ({error}). Pass tokenizer= "
            "(Python) or --tokenizer (CLI): a local folder with the CLIP tokenizer (vocab.json + merges.txt), "
            "e.g. the 'tokenizer/' folder of a diffusers copy of the model."
        ) from error


def _text_layout(part: dict[str, torch.Tensor], path: Path) -> str:
    """``"v1"`` (OpenAI CLIP under ``transformer.``) or ``"v2"`` (OpenCLIP under ``model.``)."""
    if not part:
        raise ValueError(f"{path} has no text encoder (cond_stage_model.*); ldm needs one to generate from text")
    if all(k.startswith("transformer.") for k in part):
        return "v1"
    if all(k.startswith("model.") for k in part):
        return "v2"
    odd = sorted(k for k in part if not k.startswith(("transformer.", "model.")))
    raise ValueError(f"{path}: unknown text-encoder layout under cond_stage_model. (expected transformer.* for SD v1 "
                     f"or model.* for SD v2), e.g. {odd[:5]}")


def _text_encoder(part: dict[str, torch.Tensor], layout: str, stored: dict[str, Any], layer: str | None,
                  tokenizer: CLIPTokenizer, path: Path) -> TextEncoder:
    if layout == "v1":
        state, default_layer = sd_v1_clip_to_transformers(part), "last"
        config = clip_config_from_state(state, hidden_act="quick_gelu")
    else:
        (state, config), default_layer = openclip_to_transformers(part), "penultimate"
    if "text_encoder" in stored:
        check_clip_text_config(stored["text_encoder"], _meta_source(path), "text_encoder")
        config = CLIPTextConfig(**stored["text_encoder"])
    model = CLIPTextModel(config)
    _load_strict(model, state, "text encoder", path)
    stored_layer, stored_length = stored.get("text_encoder_layer"), stored.get("text_encoder_max_length")
    if stored_layer is not None and stored_layer not in LAYERS:
        raise ConfigError("text_encoder_layer", f"got {stored_layer!r}; expected one of {', '.join(LAYERS)}", _meta_source(path))
    if stored_length is not None and (not isinstance(stored_length, int) or isinstance(stored_length, bool)
                                      or not 0 < stored_length <= config.max_position_embeddings):
        raise ConfigError("text_encoder_max_length", f"got {stored_length!r}; expected an integer from 1 to "
                          f"max_position_embeddings={config.max_position_embeddings}", _meta_source(path))
    layer = layer or stored_layer or default_layer
    max_length = stored_length or min(int(tokenizer.model_max_length), config.max_position_embeddings)
    return TextEncoder(model, tokenizer, layer=layer, max_length=max_length).eval()


def read_vae_part(state: dict[str, torch.Tensor], stored: dict[str, Any], path: Path, vae_encoder: bool) -> KLAutoencoder:
    """The VAE of a single file (``first_stage_model.*`` without the prefix): its config from the header's ``vae``
    entry (``stored``, completed by the shapes), else inferred from the shapes.

    Raises:
        ValueError: without VAE weights, for an unknown layout, or weights that do not fit, naming ``path``.
    """
    if not state:
        raise ValueError(f"{path} has no VAE (first_stage_model.*); load the VAE separately or use a full checkpoint")
    try:
        inferred = vae_config_from_state_dict(state)
    except KeyError as error:
        if "vae" not in stored:
            raise ValueError(f"{path}: unknown VAE layout under first_stage_model.: {error}") from error
        inferred = {}
    config = _stored_config(AutoencoderConfig, stored, "vae", inferred, path) if "vae" in stored \
        else AutoencoderConfig.from_dict(inferred)
    vae = KLAutoencoder(config, with_encoder=vae_encoder)
    _load_strict(vae, state, "VAE", path)
    return vae


def read_unet_part(state: dict[str, torch.Tensor], inferred: dict[str, Any], stored: dict[str, Any],
                   heads: dict[str, int] | None, path: Path) -> UNetModel:
    """The UNet of a single file: the config our header stores (the shapes fill in what an old export left out; heads
    from UNetConfig's defaults, as then), else the one ``inferred`` from the shapes; ``heads`` override; weights
    loaded strictly (errors name ``path``)."""
    if "unet" in stored:
        shape = {k: v for k, v in inferred.items() if k not in ("num_heads", "num_head_channels")}
        config = _stored_config(UNetConfig, stored, "unet", shape, path).to_dict()
    else:
        config = dict(inferred)
    config.update(heads or {})
    try:
        unet = UNetModel(**config)
    except ValueError as error:
        raise ValueError(f"{path}: the UNet's head settings do not fit its widths ({error}); pass num_heads or "
                         "num_head_channels that divide every attention block's channels") from error
    _load_strict(unet, state, "UNet", path)
    return unet


def read_sd_single_file(
    path: str | Path,
    use_ema: bool = True,
    prediction_type: str | None = None,
    tokenizer: str | Path | None = None,
    text_encoder_layer: str | None = None,
    num_heads: int | None = None,
    num_head_channels: int | None = None,
    vae_encoder: bool = True,
) -> ModelComponents:
    """Build a whole model from an original SD 1.x/2.x single file (``.safetensors`` or ``.ckpt``, read safely); an
    SDXL file (``conditioner.embedders.*``) is refused here: :func:`ldm.formats.load.load_components` reads both.

    Args:
        path: The checkpoint.
        use_ema: Take the UNet's ``model_ema.*`` weights when the file has them.
        prediction_type: ``epsilon`` or ``v_prediction`` (SD 2.x 768-v models); ``None``: from the file's
            ldm metadata, a config YAML beside it, else ``epsilon``.
        tokenizer: A local tokenizer folder or hub id (see the module docstring).
        text_encoder_layer: ``last`` or ``penultimate``; ``None``: v1 last, v2 penultimate.
        num_heads: Attention heads of the UNet's transformers (tensor shapes cannot tell them, and a wrong count
            gives wrong images); ``None``: from the file's ldm metadata, the YAML beside it (``unet_config.params``),
            else SD's convention (v1: 8).
        num_head_channels: Channels per head instead (SD v2: 64); heads = channels // this. Giving one of the two
            sets the other to -1 (unused), as in the original configs.
        vae_encoder: False builds the VAE without its encoder (its weights are read only to hash them; see
            :class:`~ldm.nn.autoencoder.KLAutoencoder`).

    Raises:
        FileNotFoundError: if the file (or a given tokenizer folder) does not exist.
        ValueError: for an unknown layout or weights that do not fit, naming the offending keys.
    """
    path = Path(path)
    parts = load_sd_checkpoint(path, use_ema=use_ema)
    if is_sdxl_checkpoint(parts):
        raise ValueError(f"{path} is an SDXL single file: read it with ldm.formats.load_components (or "
                         "LatentDiffusionPipeline.from_pretrained), which detects SDXL, or read_sdxl_single_file")
    return read_sd_parts(path, parts, prediction_type, tokenizer, text_encoder_layer, num_heads, num_head_channels,
                         vae_encoder)


def read_sd_parts(path: Path, parts: dict[str, Any], prediction_type: str | None = None,
                  tokenizer: str | Path | None = None, text_encoder_layer: str | None = None,
                  num_heads: int | None = None, num_head_channels: int | None = None,
                  vae_encoder: bool = True) -> ModelComponents:
    """Build the model of an SD 1.x/2.x single file already read and split (:func:`load_sd_checkpoint`); the
    arguments are :func:`read_sd_single_file`'s."""
    stored, stored_tokenizer = _read_metadata(path)
    meta = _meta_source(path)
    sidecar = _sidecar_yaml(path)
    yaml_source = str(path.with_suffix(".yaml"))
    if not parts["unet"]:
        raise ValueError(f"{path} has no UNet weights (model.diffusion_model.*); keys look like {sorted(parts['other'])[:5]}")
    variant = detect_sd_variant(parts["unet"])
    heads = _head_settings(num_heads, num_head_channels, "the arguments")
    if heads is None and "unet" not in stored:
        heads = _yaml_heads(sidecar, path)
    unet = read_unet_part(parts["unet"], variant["unet_config"], stored, heads, path)
    vae = read_vae_part(parts["vae"], stored, path, vae_encoder)
    layout = _text_layout(parts["text_encoder"], path)
    tok = _tokenizer(tokenizer, stored_tokenizer, layout)
    text_encoder = _text_encoder(parts["text_encoder"], layout, stored, text_encoder_layer, tok, path)

    if prediction_type is not None:
        prediction = check_prediction_type(prediction_type, "the arguments")
    elif stored.get("prediction_type") is not None:
        prediction = check_prediction_type(stored["prediction_type"], meta)
    else:
        prediction = check_prediction_type(sidecar.get("parameterization") or "epsilon", yaml_source, "parameterization")
    noise = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    if stored.get("schedule") is not None:
        noise = _stored_config(ScheduleConfig, stored, "schedule", {}, path).build()
    elif "linear_start" in sidecar:
        values = {"num_timesteps": sidecar.get("timesteps", 1000), "beta_start": sidecar["linear_start"],
                  "beta_end": sidecar.get("linear_end")}
        try:
            noise = ScheduleConfig.from_dict(values).build()
        except ConfigError as error:
            raise error.located(yaml_source, rename={"num_timesteps": "timesteps", "beta_start": "linear_start",
                                                      "beta_end": "linear_end"}) from None
    if stored.get("scaling_factor") is not None:
        scaling = check_scaling_factor(stored["scaling_factor"], meta)
    elif sidecar.get("scale_factor") is not None:
        scaling = check_scaling_factor(sidecar["scale_factor"], yaml_source, "scale_factor")
    else:
        scaling = SD_SCALING_FACTOR
    sample_size = check_sample_size(stored.get("sample_size"), meta) or (
        768 if variant["version"] == "v2" and prediction == "v_prediction" else 512)
    if variant["version"] == "v2" and prediction == "epsilon" and not stored and not sidecar and prediction_type is None:
        log.warning("%s is an SD 2.x checkpoint; its prediction type cannot be read from the weights. Using epsilon "
                    "(SD 2.x 512-base); pass prediction_type='v_prediction' for the 768-v models", path)
    sampler = sampler_config_from(stored, meta, noise.num_timesteps, **SD_SAMPLER.to_dict())  # our exports store theirs; else the original's
    return ModelComponents(unet.eval(), vae.eval(), text_encoder, noise, prediction, scaling, sample_size, sampler,
                           variant=variant["version"])


def text_config_record(model: Any) -> dict[str, Any]:
    """The shape fields of a CLIP text model's config, as the ``ldm.model`` header entry records them."""
    config = model.config.to_dict()
    return {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
                                   "bos_token_id", "eos_token_id", "pad_token_id") if k in config}


def tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """The files ``tokenizer.save_pretrained`` writes (name -> text), for a safetensors header entry."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # don't record the padding/truncation state of the last call (transformers v5)
        backend.no_padding()
        backend.no_truncation()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}


def write_sd_single_file(
    path: str | Path,
    unet: UNetModel,
    unet_config: dict[str, Any],
    vae: KLAutoencoder,
    vae_config: dict[str, Any],
    text_encoder: TextEncoder,
    schedule_config: dict[str, Any],
    prediction_type: str,
    scaling_factor: float,
    sample_size: int,
    sampler_config: SamplerConfig = SD_SAMPLER,
) -> Path:
    """Write an original-layout SD single file (``.safetensors``) that SD tools load, plus ldm metadata.

    The text encoder goes in the SD v2 OpenCLIP layout (``cond_stage_model.model.*``) when it is an
    OpenCLIP-style CLIP (``hidden_act="gelu"``), else in the SD v1 layout. The header's ``ldm.model``
    entry keeps the exact configs, schedule, prediction type and sample size, and ``ldm.tokenizer`` the
    tokenizer files, and the sampler settings, so :func:`read_sd_single_file` rebuilds the very same model
    without extra arguments.
    """
    clip_state = text_encoder.model.state_dict()
    openclip = text_encoder.model.config.hidden_act == "gelu"
    text_state = transformers_to_openclip(clip_state) if openclip else transformers_to_sd_v1_clip(clip_state)
    text_config = text_config_record(text_encoder.model)
    meta = {
        "unet": unet_config,
        "vae": vae_config,
        "text_encoder": text_config,
        "text_encoder_layer": text_encoder.layer,
        "text_encoder_max_length": text_encoder.max_length,
        "schedule": schedule_config,
        "prediction_type": prediction_type,
        "scaling_factor": float(scaling_factor),
        "sample_size": int(sample_size),
        **sampler_config.to_dict(),
    }
    header = {META_KEY: json.dumps(meta, default=list), TOKENIZER_KEY: json.dumps(tokenizer_files(text_encoder.tokenizer))}
    return save_sd_checkpoint(path, unet.state_dict(), vae.state_dict(), text_state, metadata=header)
