"""diffusers ``StableDiffusionPipeline`` folders: read one into our modules (:func:`read_diffusers_folder`), write a
folder diffusers loads (:func:`write_diffusers_folder`).

A folder holds ``model_index.json``, ``unet/`` and ``vae/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``), ``text_encoder/`` and ``tokenizer/`` (transformers'
own formats: load them with ``load_text_encoder``) and ``scheduler/scheduler_config.json``.
diffusers itself is never imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ldm.formats.config_files import check_sample_size, check_scaling_factor, read_diffusers_scheduler, read_json_config
from ldm.formats.weights import check_block_count, check_config_fits, load_checked, read_safetensors
from ldm.formats.components import ModelComponents
from ldm.formats.sd_checkpoint import _contiguous_unshared
from ldm.formats.text_encoder_files import load_text_encoder
from ldm.formats.unet_keys import DIFFUSERS_UNET_KEYS, diffusers_to_ldm_unet, ldm_to_diffusers_unet, unet_config_from_diffusers, unet_config_to_diffusers
from ldm.formats.vae_keys import DIFFUSERS_VAE_KEYS, diffusers_to_ldm_vae, ldm_to_diffusers_vae, vae_config_from_diffusers, vae_config_to_diffusers
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig, ConfigError
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.unet import UNetModel

DIFFUSERS_VERSION = "0.30.0"  # recorded in the configs we write; any recent diffusers reads them
WEIGHTS_NAME = "diffusion_pytorch_model"
SCHEDULER_CLASSES = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler", "DDPMScheduler")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; is {str(path.parent.parent)!r} a diffusers folder?")
    return read_json_config(path)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``diffusion_pytorch_model[.fp16].safetensors`` (sharded too) or ``.bin`` (``weights_only=True``)."""
    for variant in ("", ".fp16"):
        single = folder / f"{WEIGHTS_NAME}{variant}.safetensors"
        if single.is_file():
            return read_safetensors(single)
        index = folder / f"{WEIGHTS_NAME}{variant}.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConfigError("weight_map", "expected an object of tensor name -> shard file name", str(index))
            shards = sorted(set(weight_map.values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(read_safetensors(folder / shard))
            return out
        binary = folder / f"{WEIGHTS_NAME}{variant}.bin"
        if binary.is_file():
            return dict(torch.load(binary, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"no {WEIGHTS_NAME}.safetensors or .bin in {str(folder)!r}")


def _renamed(rename: Any, state: dict[str, torch.Tensor], config: dict[str, Any], config_path: Path) -> dict[str, torch.Tensor]:
    """``rename(state, config)``; weights the key map of the config does not cover are a config that does not
    describe its weights."""
    check_block_count(config, state, str(config_path), "layers_per_block, block_out_channels, transformer_layers_per_block")
    try:
        return rename(state, config)
    except KeyError as error:
        raise ValueError(f"{config_path} does not describe its weights: {error.args[0]}") from None


class DiffusersStates(NamedTuple):
    """The weights and configs of a diffusers folder in our names, before any module is built."""

    unet_state: dict[str, torch.Tensor]
    unet_config: dict[str, Any]
    vae_state: dict[str, torch.Tensor]
    vae_config: dict[str, Any]
    text_encoder_path: Path | None
    tokenizer_path: Path | None
    scheduler_config: dict[str, Any] | None


def read_diffusers_states(path: str | Path) -> DiffusersStates:
    """Read a diffusers SD folder's weights into our names (no module is built: :func:`read_diffusers_folder` builds
    the model).

    Returns:
        State dicts and ``UNetModel``/``KLAutoencoder`` kwargs in our
        layout; the ``text_encoder/`` and ``tokenizer/`` folders (``None`` when absent) for
        ``transformers`` to load; the scheduler config dict (``None`` when absent). The VAE's
        ``scaling_factor`` stays in the diffusers config: read ``vae/config.json`` for it, or use
        :func:`read_vae_scaling_factor`.

    Raises:
        FileNotFoundError: if ``model_index.json``, a config or weights are missing.
        ValueError: for UNet/VAE configurations our modules cannot express, configs that do not describe their
            weights, and (``ConfigError``) bad config values, naming the file and diffusers' key.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"diffusers folder {str(root)!r} does not exist")
    _read_json(root / "model_index.json")
    unet_path, vae_path = root / "unet" / "config.json", root / "vae" / "config.json"
    unet_raw, vae_raw = _read_json(unet_path), _read_json(vae_path)
    unet_config = unet_config_from_diffusers(unet_raw, str(unet_path))
    unet_state = _renamed(diffusers_to_ldm_unet, _read_weights(root / "unet"), unet_config, unet_path)
    # A config that leaves a shape key to diffusers' default and does not fit its weights names that key.
    check_config_fits(lambda: UNetModel(**unet_config), unet_state, str(unet_path),
                      [k for k in DIFFUSERS_UNET_KEYS if k not in unet_raw])
    vae_config = vae_config_from_diffusers(vae_raw, str(vae_path))
    vae_state = _renamed(diffusers_to_ldm_vae, _read_weights(root / "vae"), vae_config, vae_path)
    check_config_fits(lambda: KLAutoencoder(**vae_config), vae_state, str(vae_path),
                      [k for k in DIFFUSERS_VAE_KEYS if k not in vae_raw])
    text_encoder = root / "text_encoder"
    tokenizer = root / "tokenizer"
    scheduler = root / "scheduler" / "scheduler_config.json"
    return DiffusersStates(unet_state, unet_config, vae_state, vae_config, text_encoder if text_encoder.is_dir() else None,
                           tokenizer if tokenizer.is_dir() else None, _read_json(scheduler) if scheduler.is_file() else None)


def read_vae_scaling_factor(path: str | Path, default: float = 0.18215) -> float:
    """The latent scaling factor recorded in a diffusers folder's ``vae/config.json`` (``default``, diffusers' own,
    when it records none).

    Raises:
        ConfigError: when it is not a finite number > 0, naming the file.
    """
    config_path = Path(path) / "vae" / "config.json"
    return check_scaling_factor(_read_json(config_path).get("scaling_factor", default), str(config_path))


def read_diffusers_folder(folder: str | Path, vae_encoder: bool = True) -> ModelComponents:
    """A diffusers Stable Diffusion folder as loaded modules in our layout; ``vae_encoder=False`` builds the VAE
    without its encoder.

    Raises:
        FileNotFoundError: if ``model_index.json``, a config, weights, ``text_encoder/`` or ``tokenizer/`` are missing.
        ValueError: for configurations our modules cannot express, or a scheduler setting we do not follow.
    """
    folder = Path(folder)
    unet_state, unet_config, vae_state, vae_config, text_path, tok_path, sched = read_diffusers_states(folder)
    if text_path is None or tok_path is None:
        raise FileNotFoundError(f"{folder} lacks text_encoder/ or tokenizer/; a text-to-image folder needs both")
    vae_config = AutoencoderConfig.from_dict(vae_config)
    unet_path = folder / "unet" / "config.json"
    latent_size = check_sample_size(_read_json(unet_path).get("sample_size"), str(unet_path),
                                    factor=vae_config.downsampling_factor) or 64
    schedule, prediction_type, sampler_config = read_diffusers_scheduler(sched or {}, str(folder / "scheduler" / "scheduler_config.json"))
    scaling_factor = read_vae_scaling_factor(folder)
    unet = UNetModel(**unet_config)
    load_checked(unet, unet_state, f"{folder / 'unet'}")
    vae = KLAutoencoder(vae_config, with_encoder=vae_encoder)
    load_checked(vae, vae_state, f"{folder / 'vae'}")
    if (folder / "text_encoder_2").is_dir():  # SDXL
        text_encoder: Any = read_sdxl_text_encoders(folder)
        check_sdxl_conditioning(unet.config, text_encoder, str(unet_path))
        force_zeros = _read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt", True)
        if not isinstance(force_zeros, bool):
            raise ConfigError("force_zeros_for_empty_prompt", f"got {force_zeros!r}; expected true or false",
                              str(folder / "model_index.json"))
    else:
        # diffusers' SD 2.x folders store the text encoder without its last layer, so "last" is right for all.
        text_encoder, force_zeros = load_text_encoder(folder, layer="last"), False
    return ModelComponents(unet.eval(), vae.eval(), text_encoder, schedule, prediction_type, scaling_factor,
                           latent_size * vae.downsampling_factor, sampler_config, force_zeros_for_empty_prompt=force_zeros)


def read_sdxl_text_encoders(folder: Path) -> DualTextEncoder:
    """SDXL's ``text_encoder/`` + ``tokenizer/`` (CLIP ViT-L) and ``text_encoder_2/`` + ``tokenizer_2/`` (OpenCLIP bigG
    with its projection), both read at the penultimate hidden states without the final norm, as diffusers does."""
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer_2").is_dir():
        raise FileNotFoundError(f"{folder} has text_encoder_2/ but lacks text_encoder/ or tokenizer_2/: an SDXL folder "
                                "needs both text encoders and both tokenizers (a refiner-only folder is not supported)")
    first = load_text_encoder(folder, layer="penultimate_raw")
    second = load_text_encoder(folder, layer="penultimate_raw", subfolder_model="text_encoder_2",
                               subfolder_tokenizer="tokenizer_2", with_projection=True)
    return DualTextEncoder(first, second)


def check_sdxl_conditioning(unet_config: Any, text_encoder: DualTextEncoder, source: str) -> None:
    """Refuse a UNet whose context or vector width does not fit the two text encoders (naming ``source``)."""
    if unet_config.context_dim != text_encoder.hidden_size:
        raise ConfigError("cross_attention_dim", f"{unet_config.context_dim} does not fit the two text encoders' "
                          f"{text_encoder.first.hidden_size} + {text_encoder.second.hidden_size} channels", source)
    expected = None if unet_config.adm_in_channels is None else text_encoder.pooled_size + 6 * unet_config.addition_time_embed_dim
    if expected is None or unet_config.adm_in_channels != expected:
        raise ConfigError("projection_class_embeddings_input_dim", f"{unet_config.adm_in_channels} does not fit SDXL's "
                          f"pooled text ({text_encoder.pooled_size}) + 6 size/crop ids x addition_time_embed_dim", source)


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(obj), indent=2) + "\n", encoding="utf-8")


def _write_model(folder: Path, class_name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    _write_json(folder / "config.json", {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config})
    save_file(_contiguous_unshared(state), str(folder / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})


def last_layer_text_encoder(model: Any, layer: str) -> Any:
    """The ``CLIPTextModel`` a diffusers folder holds for a text encoder read at ``layer``. diffusers' SD pipelines
    condition on the last hidden state (after the final layer norm), so an encoder read at the penultimate layer
    (SD 2.x) is written without its last transformer layer, as Stability's SD 2.x diffusers folders are; with the
    final layer norm on top, its last hidden state is the penultimate one of the whole model."""
    if layer == "last":
        return model
    from transformers import CLIPTextModel

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers -= 1
    dropped = f"encoder.layers.{config.num_hidden_layers}."
    shorter = CLIPTextModel(config)
    shorter.load_state_dict({k: v for k, v in model.state_dict().items() if dropped not in k})
    return shorter.eval()


def write_diffusers_folder(
    path: str | Path,
    unet_state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_state: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_encoder: Any,
    tokenizer: Any,
    scheduler_config: Mapping[str, Any],
    scheduler_class: str = "DDIMScheduler",
    prediction_type: str = "epsilon",
    vae_scaling_factor: float = 0.18215,
    sample_size: int | None = None,
    text_encoder_2: Any = None,
    tokenizer_2: Any = None,
    force_zeros_for_empty_prompt: bool = True,
) -> Path:
    """Write a folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads (with ``text_encoder_2``: a
    ``StableDiffusionXLPipeline`` folder).

    Args:
        path: Output folder (created).
        unet_state, unet_config: Our ``UNetModel`` weights and kwargs.
        vae_state, vae_config: Our ``KLAutoencoder`` weights and kwargs.
        text_encoder: A ``transformers.CLIPTextModel`` (written with its ``save_pretrained``).
        tokenizer: Its ``CLIPTokenizer`` (``save_pretrained``).
        scheduler_config: The schedule part of a diffusers scheduler config
            (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ...), e.g.
            ``NoiseSchedule.to_diffusers_scheduler_config()``.
        scheduler_class: diffusers scheduler class recorded (``DDIMScheduler``,
            ``DPMSolverMultistepScheduler``, ...).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        vae_scaling_factor: Latent scale (SD: 0.18215).
        sample_size: Latent size recorded in the UNet config (image size / 8); default: the VAE's
            ``resolution`` divided by its downsampling factor.
        text_encoder_2, tokenizer_2: SDXL's second text encoder (``CLIPTextModelWithProjection``) and tokenizer.
        force_zeros_for_empty_prompt: SDXL: recorded in ``model_index.json`` (zero embeddings for the unconditional
            branch when no negative prompt is given).

    Returns:
        ``path`` as a ``Path``.
    """
    if scheduler_class not in SCHEDULER_CLASSES:
        raise ValueError(f"scheduler_class must be one of {SCHEDULER_CLASSES}, got {scheduler_class!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    diffusers_vae = vae_config_to_diffusers(vae_config, scaling_factor=vae_scaling_factor)
    if sample_size is None:
        sample_size = diffusers_vae["sample_size"] // 2 ** (len(diffusers_vae["block_out_channels"]) - 1)
    _write_model(root / "unet", "UNet2DConditionModel", unet_config_to_diffusers(unet_config, sample_size), ldm_to_diffusers_unet(unet_state, unet_config))
    _write_model(root / "vae", "AutoencoderKL", diffusers_vae, ldm_to_diffusers_vae(vae_state, vae_config))
    text_encoder.save_pretrained(root / "text_encoder")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # don't persist the padding/truncation state of the last call (transformers v5)
        backend.no_padding()
        backend.no_truncation()
    tokenizer.save_pretrained(root / "tokenizer")
    for model, tok in ((text_encoder_2, tokenizer_2),) if text_encoder_2 is not None else ():
        model.save_pretrained(root / "text_encoder_2")
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            backend.no_padding()
            backend.no_truncation()
        tok.save_pretrained(root / "tokenizer_2")

    scheduler: dict[str, Any] = {"_class_name": scheduler_class, "_diffusers_version": DIFFUSERS_VERSION}
    scheduler.update(dict(scheduler_config))
    scheduler["prediction_type"] = prediction_type
    # ldm's samplers never clip x0; say so for diffusers' schedulers that would by default (DDIM/DDPM swapped in).
    scheduler.setdefault("clip_sample", False)
    if scheduler_class == "DDIMScheduler":
        scheduler.setdefault("set_alpha_to_one", False)
        scheduler.setdefault("steps_offset", 1)
    elif scheduler_class == "DPMSolverMultistepScheduler":
        scheduler.setdefault("algorithm_type", "dpmsolver++")
        scheduler.setdefault("solver_order", 2)
        scheduler.setdefault("steps_offset", 1)
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)

    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if text_encoder_2 is not None:
        for key in ("safety_checker", "requires_safety_checker"):
            del index[key]
        index.update({"_class_name": "StableDiffusionXLPipeline", "image_encoder": [None, None],
                      "text_encoder_2": ["transformers", type(text_encoder_2).__name__],
                      "tokenizer_2": ["transformers", type(tokenizer_2).__name__],
                      "force_zeros_for_empty_prompt": bool(force_zeros_for_empty_prompt)})
    _write_json(root / "model_index.json", index)
    return root
