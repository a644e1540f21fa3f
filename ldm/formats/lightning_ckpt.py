"""A ``LatentDiffusion`` run's model, from its hyper-parameters and from its Lightning ``.ckpt``, without Lightning.

``LatentDiffusion`` builds its parts with :func:`components_from_hparams` and :func:`prepare_for_training`, and
this reader builds the same parts the same way, then loads the checkpoint's ``state_dict`` into them: no import of
the LightningModule (no cycle between the format layer and the training layer) and no Lightning at inference.

A run's ``init_from`` may be any layout, so these functions take the loader (``load``:
:func:`~ldm.formats.load.load_components`, which dispatches back here for ``.ckpt`` files) as an argument rather than
importing it: the modules import each other in one direction only.

A fine-tune's checkpoint (``init_from``) may omit every frozen weight, and any run's may omit the VAE's (both are
re-read from their sources); :func:`restorable_keys` says which keys may be missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ldm.diffusion import SamplerConfig, normalize_prediction_type
from ldm.formats.config_files import ScheduleConfig, check_prediction_type, check_sample_size
from ldm.formats.weights import load_checked
from ldm.formats.components import ModelComponents
from ldm.formats.ldm_folder import VAE_WEIGHTS, load_weights, read_vae_folder
from ldm.formats.text_encoder_files import load_text_encoder, new_text_encoder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import (Config, ConfigError, TextEncoderConfig, UNetArchitecture, UNetConfig, check_value,
                            non_negative, positive, probability)
from ldm.nn.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora
from ldm.nn.text_encoder import LAYERS
from ldm.nn.unet import UNetModel

__all__ = ["components_from_hparams", "source_vae", "flat_hparams", "frozen_state_keys", "check_only_frozen_missing",
           "prepare_for_training", "read_lightning_checkpoint", "restorable_keys"]

_C = TypeVar("_C", bound=Config)
Loader = Callable[..., ModelComponents]  # load_components' signature: (path, use_ema=, prediction_type=, ...)

# LatentDiffusion's groups of hyper-parameters whose fields kept the names they had as flat hyper-parameters.
HPARAM_GROUPS = ("objective", "optimizer")


def flat_hparams(h: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """``h`` with the fields of its groups (``objective``, ``optimizer``: dicts in checkpoints) at the top level, where
    checkpoints written before the grouping held them; so both kinds read the same. A group's value wins.

    Raises:
        ConfigError: for hyper-parameters or a group that are not a mapping (naming ``source``).
    """
    if not isinstance(h, Mapping):
        raise ConfigError(None, f"hyper-parameters must be a mapping, got {type(h).__name__}", source)
    flat = {k: v for k, v in h.items() if k not in HPARAM_GROUPS}
    for group in HPARAM_GROUPS:
        values = h.get(group) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(group, f"got {type(values).__name__}; expected an object of settings", source)
        flat.update(values)
    return flat


def _typed(cls: type[_C], values: Any, source: str | None, key: str, **kwargs: Any) -> _C:
    """``cls.from_dict(values)`` with errors naming ``source`` and the keys under ``key``."""
    try:
        return cls.from_dict(values, **kwargs)
    except ConfigError as error:
        raise error.located(source, prefix=key) from None


# Hyper-parameters read here beyond the typed groups: key -> annotation.
_PATH = str | os.PathLike | None
_HPARAM_TYPES = {"init_from": _PATH, "init_from_ema": bool, "text_encoder": _PATH, "tokenizer": _PATH,
                 "text_encoder_layer": str | None, "train_text_encoder": bool, "prediction_type": str | None,
                 "lora_rank": int, "lora_alpha": float | None, "lora_targets": tuple[str, ...],
                 "lora_text_encoder": bool, "lora_text_encoder_targets": tuple[str, ...], "lora_dropout": float,
                 "autoencoder": _PATH}


def _check_hparams(h: Mapping[str, Any], flat: Mapping[str, Any], source: str | None) -> ScheduleConfig | None:
    """Type and range checks of the hyper-parameters the model is built from (before anything is built); returns
    the noise schedule of a new model (None with ``init_from``: the model's own)."""
    for key, hint in _HPARAM_TYPES.items():
        if key in flat:
            try:
                check_value(key, flat[key], hint)
            except ConfigError as error:
                raise error.located(source) from None
    if flat.get("prediction_type") is not None:
        check_prediction_type(flat["prediction_type"], source or "hyper-parameters")
    for key, rule in (("lora_rank", non_negative), ("lora_alpha", positive), ("lora_dropout", probability)):
        problem = rule(flat[key]) if flat.get(key) is not None else None
        if problem:
            raise ConfigError(key, problem, source)
    if flat.get("unet") is not None:
        _typed(UNetArchitecture, flat["unet"], source, "unet")
    if flat.get("text_encoder_config") is not None:
        _typed(TextEncoderConfig, flat["text_encoder_config"], source, "text_encoder_config")
    if flat.get("init_from") is not None:
        return None
    prefix = "objective" if isinstance(h.get("objective"), Mapping) else None
    values = {"kind": flat.get("schedule") or "scaled_linear",
              **{k: flat[k] for k in ("num_timesteps", "beta_start", "beta_end", "zero_terminal_snr") if k in flat}}
    try:
        return ScheduleConfig.from_dict(values)
    except ConfigError as error:
        raise error.located(source, prefix=prefix, rename={"kind": "schedule"}) from None


def components_from_hparams(h: Mapping[str, Any], load: Loader, vae_encoder: bool = True,
                            source: str | None = None) -> ModelComponents:
    """The parts a ``LatentDiffusion`` with hyper-parameters ``h`` starts from: ``init_from``'s model, or a new UNet
    (``unet`` config) on a trained VAE folder (``autoencoder``) and a text encoder (``text_encoder`` or a small one
    from ``tokenizer`` + ``text_encoder_config``). ``load`` reads ``init_from``; ``vae_encoder=False`` builds the VAE
    without its encoder.

    Raises:
        ConfigError: for a hyper-parameter of the wrong type or out of range, naming ``source`` (the checkpoint) and
            the key, before anything is built.
    """
    grouped = h
    h = flat_hparams(h, source)
    schedule = _check_hparams(grouped, h, source)
    init_from = h.get("init_from")
    if init_from is not None:
        given = [name for name in ("autoencoder", "unet", "text_encoder") if h.get(name) is not None]
        if given:
            raise ValueError(f"init_from={init_from!r} brings its own VAE, UNet and text encoder; leave out {given}")
        if h.get("schedule") is not None:
            raise ValueError("with init_from the noise schedule is the model's; leave out objective.schedule")
        parts = load(init_from, use_ema=h.get("init_from_ema", True), prediction_type=h.get("prediction_type"),
                     tokenizer=h.get("tokenizer"), vae_encoder=vae_encoder)
        layer = h.get("text_encoder_layer")
        if layer is not None:
            if layer not in LAYERS:
                raise ValueError(f"text_encoder_layer={layer!r}; use one of {LAYERS}")
            if parts.is_sdxl:
                raise ValueError(f"text_encoder_layer={layer!r}: {init_from} is an SDXL model, whose two text encoders "
                                 "are read at SDXL's layer (penultimate, no final norm); leave text_encoder_layer out")
            parts.text_encoder.layer = layer
        return parts
    autoencoder, unet = h.get("autoencoder"), h.get("unet")
    if autoencoder is None or unet is None:
        raise ValueError("give autoencoder (a VAE folder) and unet (its config) to train a new model, or init_from "
                         "(an SD checkpoint, diffusers folder or ldm model) to fine-tune")
    vae, scaling_factor = _vae_from_folder(autoencoder, vae_encoder)
    layer = h.get("text_encoder_layer")
    if h.get("text_encoder") is not None:
        text_encoder = load_text_encoder(h["text_encoder"], layer=layer)
    elif h.get("tokenizer") is not None:
        config = _typed(TextEncoderConfig, h.get("text_encoder_config") or {}, source, "text_encoder_config")
        text_encoder = new_text_encoder(h["tokenizer"], config, layer=layer or "last")
    else:
        raise ValueError("give text_encoder (a pretrained CLIP) or tokenizer (to build a small CLIP)")
    unet_config = _typed(UNetConfig, {"context_dim": text_encoder.hidden_size, "in_channels": vae.latent_channels,
                                      "out_channels": vae.latent_channels, **unet}, source, "unet")
    return ModelComponents(UNetModel(unet_config), vae.eval(), text_encoder, schedule.build(),
                           normalize_prediction_type(h.get("prediction_type") or "epsilon"), scaling_factor, None,
                           SamplerConfig())


def _vae_from_folder(path: str, vae_encoder: bool) -> tuple[KLAutoencoder, float]:
    """The VAE of an autoencoder folder and its scaling factor (both checked: errors name the file and key)."""
    config, scaling_factor, _, folder = read_vae_folder(path)
    vae = KLAutoencoder(config, with_encoder=vae_encoder)
    load_checked(vae, load_weights(folder, VAE_WEIGHTS), str(folder))
    return vae, scaling_factor


def source_vae(h: Mapping[str, Any], load: Loader) -> KLAutoencoder:
    """The whole VAE (encoder included) of hyper-parameters ``h``, re-read from its source: the ``autoencoder`` folder
    (only the VAE is read) or ``init_from``'s model."""
    if h.get("init_from") is not None:
        return components_from_hparams(h, load).vae
    return _vae_from_folder(h["autoencoder"], True)[0].eval()


def prepare_for_training(model: nn.Module, h: Mapping[str, Any]) -> None:
    """Freeze what ``h`` does not train and add its LoRA adapters, on ``model.unet``/``.autoencoder``/``.text_encoder``."""
    model.autoencoder.eval().requires_grad_(False)
    model.unet.train().requires_grad_(True)
    if not h.get("train_text_encoder", False):
        model.text_encoder.freeze()
    rank = h.get("lora_rank", 0)
    if rank > 0:
        alpha, dropout = h.get("lora_alpha"), h.get("lora_dropout", 0.0)
        add_lora(model.unet, rank=rank, alpha=alpha, target_modules=h.get("lora_targets", list(UNET_TARGETS)), dropout=dropout)
        if h.get("lora_text_encoder", False):  # SDXL: both text encoders
            for encoder in getattr(model.text_encoder, "encoders", (model.text_encoder,)):
                add_lora(encoder.model, rank=rank, alpha=alpha, dropout=dropout,
                         target_modules=h.get("lora_text_encoder_targets", list(TEXT_ENCODER_TARGETS)))
    elif h.get("lora_text_encoder", False):
        raise ValueError("lora_text_encoder needs lora_rank > 0")


def frozen_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of ``module`` other than trainable parameters and top-level buffers (e.g. a scaling factor)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k for k in module.state_dict() if k not in trainable and "." in k}


def restorable_keys(module: nn.Module, h: Mapping[str, Any]) -> set[str]:
    """Keys a checkpoint of ``module`` may omit: construction re-read them from the sources. With ``init_from`` every
    frozen weight, else the VAE's (a run without the VAE's encoder writes checkpoints without it)."""
    if h.get("init_from") is not None:
        return frozen_state_keys(module)
    return {k for k in module.state_dict() if k.startswith("autoencoder.")}


def check_only_frozen_missing(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                              restorable: set[str] | None = None) -> None:
    """Raise unless ``state`` holds every weight of ``module`` other than ``restorable`` (default: its frozen
    weights) and nothing it lacks.

    Raises:
        ValueError: naming the missing trained keys and the unexpected ones.
    """
    expected = set(module.state_dict())
    restorable = frozen_state_keys(module) if restorable is None else restorable
    not_frozen = (expected - set(state)) - restorable
    unexpected = set(state) - expected
    if not_frozen or unexpected:
        raise ValueError(f"{source} does not fit this model: missing trained weights {sorted(not_frozen)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def without_dropped_encoder(vae: KLAutoencoder, state: Mapping[str, torch.Tensor], prefix: str = "autoencoder.") -> dict:
    """``state`` less the VAE encoder's weights when ``vae`` has none (a run that had one wrote them)."""
    if vae.encoder is None:
        dropped = {f"{prefix}{k}" for k in vae.encoder_state_spec}
        return {k: v for k, v in state.items() if k not in dropped}
    return dict(state)


class _RunModules(nn.Module):
    """A ``LatentDiffusion``'s modules under its state-dict names, without the LightningModule."""

    def __init__(self, parts: ModelComponents):
        super().__init__()
        self.unet, self.autoencoder, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.register_buffer("scaling_factor", torch.tensor(float(parts.scaling_factor)))


def read_lightning_checkpoint(path: Path, ckpt: Mapping[str, Any], load: Loader, use_ema: bool = True,
                              vae_encoder: bool = True) -> ModelComponents:
    """The model in a ``LatentDiffusion`` checkpoint (``ckpt``, already read with ``weights_only=True``): EMA weights
    (the ``state_dict``) unless ``use_ema`` is false and the raw ones were kept; fp32; LoRA adapters unmerged."""
    source = f"{path} (hyper_parameters)"
    hparams = ckpt.get("hyper_parameters", {})
    if not isinstance(hparams, Mapping):
        raise ConfigError(None, f"hyper-parameters must be a mapping, got {type(hparams).__name__}", source)
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    parts = components_from_hparams(hparams, load, vae_encoder, source)
    modules = _RunModules(parts)
    prepare_for_training(modules, hparams)
    state = ckpt["state_dict"] if use_ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    state = without_dropped_encoder(parts.vae, state)
    check_only_frozen_missing(modules, state, str(path), restorable_keys(modules, hparams))
    load_checked(modules, state, str(path), strict=False)
    modules.float()  # weights stored in half precision for training (frozen_dtype) come back as fp32
    if ckpt.get("ldm_image_size") is not None:
        image_size = check_sample_size(ckpt["ldm_image_size"], str(path), "ldm_image_size")
    else:
        datamodule = ckpt.get("datamodule_hyper_parameters") or {}
        image_size = check_sample_size(datamodule.get("image_size") if isinstance(datamodule, Mapping) else None,
                                       str(path), "datamodule_hyper_parameters.image_size")
    parts.scaling_factor = float(modules.scaling_factor)
    parts.sample_size = image_size
    parts.unet.eval()
    parts.text_encoder.eval()
    return parts
