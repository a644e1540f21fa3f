"""Config files with bad values: every reader checks them through the typed configs and raises a ``ValueError`` naming
the file and the key (never a torch error from deep inside a module, never a silent default).

A valid tiny model is written once per layout (our folder, diffusers folder, SD single file with ldm metadata, an
AutoencoderKL folder, a Lightning checkpoint, a LoRA file); each case copies it, corrupts one value and loads it.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TINY_TEXT, TINY_UNET, TINY_VAE, TINY_VAE_SHAPE, make_ldm_assets, tiny_ldm_kwargs
from ldm.diffusion import NoiseSchedule, SamplerConfig
from ldm.formats import load_components, load_lora, save_components, save_lora
from ldm.formats.components import ModelComponents
from ldm.formats.config_files import MAX_SAMPLE_SIZE, parse_json_config, read_json_config
from ldm.formats.text_encoder_files import new_text_encoder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import (AutoencoderConfig, ConfigError, TextEncoderConfig, UNetArchitecture, UNetConfig,
                            check_fields)
from ldm.nn.lora import add_lora
from ldm.nn.unet import UNetModel

NAN, INF = float("nan"), float("inf")
DELETE = object()  # a value that removes the key


# ------------------------------------------------------------------------------------------------ the typed configs


@pytest.mark.parametrize(("cls", "field", "value", "expected"), [
    (UNetConfig, "model_channels", "16", "expected an integer"),
    (UNetConfig, "model_channels", -16, "> 0"),
    (UNetConfig, "model_channels", 16.0, "expected an integer"),
    (UNetConfig, "model_channels", True, "expected an integer"),  # a bool is no int
    (UNetConfig, "channel_mult", 2, "expected a list of integers"),
    (UNetConfig, "channel_mult", [], "empty list"),
    (UNetConfig, "channel_mult", [1, "2"], "expected a list of integers"),
    (UNetConfig, "channel_mult", {"a": 1}, "expected a list of integers"),
    (UNetConfig, "attention_resolutions", [0], "> 0"),
    (UNetConfig, "num_heads", 0, "or -1"),
    (UNetConfig, "num_head_channels", -2, "or -1"),
    (UNetConfig, "context_dim", "768", "an integer or null"),
    (UNetConfig, "dropout", NAN, "finite"),
    (UNetConfig, "dropout", 1.0, r"\[0, 1\)"),
    (UNetConfig, "norm_groups", 0, "> 0"),
    (UNetConfig, "use_checkpoint", 1, "true or false"),
    (UNetArchitecture, "num_res_blocks", 0, "> 0"),
    (UNetArchitecture, "transformer_depth", None, "expected an integer"),
    (AutoencoderConfig, "ch", -8, "> 0"),
    (AutoencoderConfig, "ch_mult", 2, "expected a list of integers"),
    (AutoencoderConfig, "dropout", INF, "finite"),
    (AutoencoderConfig, "mid_attention", "yes", "true or false"),
    (AutoencoderConfig, "embed_dim", 0, "> 0"),
    (TextEncoderConfig, "num_layers", 0, "> 0"),
    (TextEncoderConfig, "intermediate_size", "64", "an integer or null"),
])
def test_a_bad_field_raises_a_config_error_naming_the_field_and_value(cls, field, value, expected):
    with pytest.raises(ConfigError, match=rf"^{field}: got .*{expected}") as info:
        cls(**{field: value})
    assert isinstance(info.value, ValueError) and info.value.key == field


def test_fields_are_normalised_as_before():
    config = UNetConfig(channel_mult=[1, 2], attention_resolutions=[], dropout=0, model_channels=16, num_heads=4)
    assert config.channel_mult == (1, 2) and config.attention_resolutions == () and config.dropout == 0.0
    assert isinstance(config.dropout, float) and config == UNetConfig(channel_mult=(1, 2), attention_resolutions=(),
                                                                        model_channels=16, num_heads=4)
    assert UNetConfig(context_dim=None).context_dim is None  # an unconditional UNet
    assert AutoencoderConfig(in_channels=1).out_channels == 1
    assert UNetConfig.from_dict(config.to_dict()) == config


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="num_heads: .*both -1"):
        UNetConfig(num_heads=-1, num_head_channels=-1)
    with pytest.raises(ConfigError, match="num_head_channels: 48 channels .* not divisible by num_head_channels=32"):
        UNetArchitecture(model_channels=16, channel_mult=(1, 3), attention_resolutions=(2,), num_head_channels=32)
    with pytest.raises(ConfigError, match="num_heads: hidden_size=30 must be divisible by num_heads=4"):
        TextEncoderConfig(hidden_size=30, num_heads=4)


def test_from_dict_names_the_source_checks_required_keys_and_ignores_other_keys():
    values = {"_class_name": "UNetModel", "learning_rate": 1, "model_channels": 16, "num_heads": 4}
    assert UNetConfig.from_dict(values).model_channels == 16
    with pytest.raises(ConfigError, match=r"^a/config.json: in_channels, context_dim: missing"):
        UNetConfig.from_dict(values, source="a/config.json", required=("in_channels", "model_channels", "context_dim"))
    with pytest.raises(ConfigError, match=r"^a/config.json: model_channels: got '16' \(a string\); expected an integer$"):
        UNetConfig.from_dict({"model_channels": "16"}, source="a/config.json")
    with pytest.raises(ConfigError, match=r"^a/config.json: expected an object of UNetConfig fields, got \[1, 2\]"):
        UNetConfig.from_dict([1, 2], source="a/config.json")
    with pytest.raises(ConfigError, match="norm_groups"):
        UNetConfig(model_channels=16, num_heads=4).replace(norm_groups=-1)
    with pytest.raises(ConfigError, match="num_layers"):
        TextEncoderConfig.coerce({"num_layers": "2"})


def test_errors_keep_the_first_source_and_take_a_prefix_and_renames():
    error = ConfigError("model_channels", "got -1; expected a value > 0")
    assert str(error.located("f.json", prefix="unet")) == "f.json: unet.model_channels: got -1; expected a value > 0"
    assert str(error.located("f.json", rename={"model_channels": "block_out_channels"})).startswith("f.json: block_out_channels:")
    assert error.located("first").located("second").source == "first"
    copy = pickle.loads(pickle.dumps(error.located("f.json")))  # crosses DataLoader workers and DDP ranks intact
    assert (type(copy), str(copy), copy.key) == (ConfigError, "f.json: model_channels: got -1; expected a value > 0",
                                                 "model_channels")


def test_check_fields_types_the_sampler_settings():
    assert check_fields(SamplerConfig, {"steps_offset": 1, "other": "x"}) == {"steps_offset": 1}
    with pytest.raises(ConfigError, match=r"^s.json: steps_offset: got '1' \(a string\); expected an integer"):
        check_fields(SamplerConfig, {"steps_offset": "1"}, "s.json")


def test_json_errors_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: is not valid JSON: .* \(line 4, column 1\)"):
        read_json_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: holds a JSON list, not an object"):
        read_json_config(path)
    with pytest.raises(FileNotFoundError):
        read_json_config(tmp_path / "missing.json")
    assert parse_json_config('{"a": NaN}', "x")["a"] != 0  # NaN parses; the typed configs refuse it where it lands


# ------------------------------------------------------------------------------------------------ the layouts


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One valid tiny model in every layout a reader takes."""
    from ldm.data.tokenizer import train_clip_tokenizer
    from ldm.models import AutoencoderKL, LatentDiffusion

    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer([f"a red circle {i}" for i in range(30)], root / "tok", vocab_size=600)
    text = new_text_encoder(tokenizer, TextEncoderConfig(**TINY_TEXT))
    unet = UNetModel(**TINY_UNET, context_dim=text.hidden_size, in_channels=4, out_channels=4)
    vae = KLAutoencoder(**TINY_VAE_SHAPE)
    parts = ModelComponents(unet.eval(), vae.eval(), text.eval(), NoiseSchedule(), "epsilon", 0.5, 32)
    out = {"ours": save_components(parts, root / "ours", "ldm"),
           "diffusers": save_components(parts, root / "diffusers", "diffusers"),
           "sd": save_components(parts, root / "model.safetensors", "sd")}
    autoencoder = AutoencoderKL(**TINY_VAE)
    autoencoder.scaling_factor.fill_(0.5)
    out["autoencoder"] = autoencoder.save_pretrained(root / "autoencoder")
    assets = make_ldm_assets(root / "assets")
    model = LatentDiffusion(**tiny_ldm_kwargs(assets))
    out["ckpt"] = root / "run.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "ldm_image_size": 32}, out["ckpt"])
    add_lora(unet, rank=2, alpha=2)
    out["lora"] = save_lora(root / "lora.safetensors", unet=unet)
    return out


def _copy(saved: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    source = saved[layout]
    target = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return target


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    """``values[key] = value`` for a dotted ``key`` (``unet.model_channels``); :data:`DELETE` removes it."""
    *groups, last = key.split(".")
    for group in groups:
        values = values[group]
    if value is DELETE:
        del values[last]
    else:
        values[last] = value


def _edit_json(path: Path, key: str, value: Any) -> None:
    values = json.loads(path.read_text())
    _set(values, key, value)
    path.write_text(json.dumps(values))  # NaN/Infinity as JSON's usual extension (what json.dumps writes)


def _edit_header(path: Path, entry: str, key: str | None, value: Any, dotted: bool = True) -> None:
    """Rewrite a safetensors file with ``key`` of the JSON in header ``entry`` set (``key`` None: ``value`` is the
    entry's new raw text; ``dotted``: a dotted key goes into groups)."""
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if key is None:
        header[entry] = value
    else:
        values = json.loads(header[entry])
        if dotted:
            _set(values, key, value)
        else:
            values[key] = value
        header[entry] = json.dumps(values)
    save_file(tensors, str(path), metadata=header)


def _load_folder(path: Path) -> Any:
    return load_components(path)


def _load_autoencoder(path: Path) -> Any:
    from ldm.models import AutoencoderKL

    return AutoencoderKL.from_pretrained(path)


def _load_lora(path: Path) -> Any:
    return load_lora(UNetModel(**TINY_UNET, context_dim=TINY_TEXT["hidden_size"]), path)


LOADERS: dict[str, Callable[[Path], Any]] = {"ours": _load_folder, "diffusers": _load_folder, "sd": _load_folder,
                                             "autoencoder": _load_autoencoder, "ckpt": _load_folder, "lora": _load_lora}


@pytest.mark.parametrize("layout", list(LOADERS))
def test_the_valid_files_load(saved, layout, tmp_path):
    LOADERS[layout](_copy(saved, layout, tmp_path))


# (layout, file in it, key, value); value INVALID_JSON writes broken JSON, a key None replaces the whole document.
INVALID_JSON = object()
FILE_CASES = [
    # our folder
    ("ours", "unet/config.json", "model_channels", "16"),
    ("ours", "unet/config.json", "model_channels", -16),
    ("ours", "unet/config.json", "channel_mult", 2),
    ("ours", "unet/config.json", "attention_resolutions", {"2": True}),
    ("ours", "unet/config.json", "in_channels", DELETE),
    ("ours", "unet/config.json", "context_dim", DELETE),
    ("ours", "unet/config.json", "dropout", NAN),
    ("ours", "unet/config.json", "num_head_channels", 3),
    ("ours", "unet/config.json", None, [1, 2]),
    ("ours", "unet/config.json", None, INVALID_JSON),
    ("ours", "vae/config.json", "ch", "8"),
    ("ours", "vae/config.json", "ch_mult", 2),
    ("ours", "vae/config.json", "z_channels", DELETE),
    ("ours", "vae/config.json", "scaling_factor", DELETE),
    ("ours", "vae/config.json", "scaling_factor", 0),
    ("ours", "vae/config.json", "scaling_factor", INF),
    ("ours", "vae/config.json", "norm_groups", -4),
    ("ours", "model_index.json", "sample_size", 1e9),
    ("ours", "model_index.json", "sample_size", 10**9),
    ("ours", "model_index.json", "sample_size", -32),
    ("ours", "model_index.json", "text_encoder_layer", "middle"),
    ("ours", "model_index.json", None, INVALID_JSON),
    ("ours", "model_index.json", None, ["unet", "vae"]),
    ("ours", "scheduler/scheduler_config.json", "beta_start", NAN),
    ("ours", "scheduler/scheduler_config.json", "beta_end", 1.5),
    ("ours", "scheduler/scheduler_config.json", "num_timesteps", -5),
    ("ours", "scheduler/scheduler_config.json", "num_timesteps", 10**12),
    ("ours", "scheduler/scheduler_config.json", "kind", "quadratic"),
    ("ours", "scheduler/scheduler_config.json", "prediction_type", "sample"),
    ("ours", "scheduler/scheduler_config.json", "prediction_type", DELETE),
    ("ours", "scheduler/scheduler_config.json", "steps_offset", "1"),
    ("ours", "scheduler/scheduler_config.json", "timestep_spacing", "middle"),
    ("ours", "scheduler/scheduler_config.json", None, INVALID_JSON),
    ("ours", "text_encoder/config.json", "hidden_size", "16"),
    ("ours", "text_encoder/config.json", "num_attention_heads", 0),
    ("ours", "text_encoder/config.json", "ldm_text_layer", "middle"),
    ("ours", "text_encoder/config.json", None, INVALID_JSON),
    # diffusers folder
    ("diffusers", "unet/config.json", "block_out_channels", 2),
    ("diffusers", "unet/config.json", "block_out_channels", ["16", 32]),
    ("diffusers", "unet/config.json", "block_out_channels", [-16, -32]),
    ("diffusers", "unet/config.json", "layers_per_block", [1, 1]),
    ("diffusers", "unet/config.json", "layers_per_block", 0),
    ("diffusers", "unet/config.json", "cross_attention_dim", "16"),
    ("diffusers", "unet/config.json", "attention_head_dim", "8"),
    ("diffusers", "unet/config.json", "norm_num_groups", 0),
    ("diffusers", "unet/config.json", "use_linear_projection", "no"),
    ("diffusers", "unet/config.json", "down_block_types", ["DownBlock2D"]),
    ("diffusers", "unet/config.json", "sample_size", 1e9),
    ("diffusers", "unet/config.json", "sample_size", 10**9),
    ("diffusers", "unet/config.json", None, INVALID_JSON),
    ("diffusers", "vae/config.json", "block_out_channels", 8),
    ("diffusers", "vae/config.json", "latent_channels", -4),
    ("diffusers", "vae/config.json", "scaling_factor", 0),
    ("diffusers", "vae/config.json", "scaling_factor", NAN),
    ("diffusers", "vae/config.json", "scaling_factor", "0.18215"),
    ("diffusers", "vae/config.json", None, [8, 16]),
    ("diffusers", "scheduler/scheduler_config.json", "beta_end", NAN),
    ("diffusers", "scheduler/scheduler_config.json", "num_train_timesteps", "1000"),
    ("diffusers", "scheduler/scheduler_config.json", "beta_schedule", "exponential"),
    ("diffusers", "scheduler/scheduler_config.json", "prediction_type", "sample"),
    ("diffusers", "scheduler/scheduler_config.json", "steps_offset", -1),
    ("diffusers", "model_index.json", None, INVALID_JSON),
    # an autoencoder folder (AutoencoderKL.from_pretrained)
    ("autoencoder", "config.json", "scaling_factor", DELETE),
    ("autoencoder", "config.json", "scaling_factor", 0),
    ("autoencoder", "config.json", "scaling_factor", -0.5),
    ("autoencoder", "config.json", "ch_mult", 2),
    ("autoencoder", "config.json", "ch", "8"),
    ("autoencoder", "config.json", "ch", DELETE),
    ("autoencoder", "config.json", "dropout", NAN),
    ("autoencoder", "config.json", None, INVALID_JSON),
]


@pytest.mark.parametrize(("layout", "file", "key", "value"), FILE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3] if c[3] not in (DELETE, INVALID_JSON) else ('missing' if c[3] is DELETE else 'invalid')}"
                              for c in FILE_CASES])
def test_a_bad_config_file_value_names_the_file_and_key(saved, tmp_path, layout, file, key, value):
    root = _copy(saved, layout, tmp_path)
    path = root / file
    if value is INVALID_JSON:
        path.write_text(path.read_text()[:-5])
    elif key is None:
        path.write_text(json.dumps(value))
    else:
        _edit_json(path, key, value)
    with pytest.raises(ValueError) as info:
        LOADERS[layout](root)
    message = str(info.value)
    assert str(path) in message, message
    if key is not None:
        assert key in message, message
    elif value is INVALID_JSON:
        assert re.search(r"not valid JSON: .* \(line \d+, column \d+\)", message), message
    assert isinstance(info.value, ConfigError), f"{type(info.value).__name__}: {message}"


# (entry of the safetensors header, key in its JSON, value); key None: the entry's raw text.
HEADER_CASES = [
    ("ldm.model", None, "{not json"),
    ("ldm.model", None, "[1, 2]"),
    ("ldm.model", "unet.model_channels", "16"),
    ("ldm.model", "unet.channel_mult", 2),
    ("ldm.model", "unet", [16, 32]),
    ("ldm.model", "vae.ch", -8),
    ("ldm.model", "vae.ch_mult", 2),
    ("ldm.model", "text_encoder.hidden_size", "16"),
    ("ldm.model", "text_encoder.num_attention_heads", 0),
    ("ldm.model", "schedule.beta_start", NAN),
    ("ldm.model", "schedule.num_timesteps", "1000"),
    ("ldm.model", "schedule", "scaled_linear"),
    ("ldm.model", "prediction_type", "sample"),
    ("ldm.model", "scaling_factor", 0),
    ("ldm.model", "scaling_factor", INF),
    ("ldm.model", "sample_size", 1e9),
    ("ldm.model", "sample_size", MAX_SAMPLE_SIZE + 8),
    ("ldm.model", "steps_offset", "1"),
    ("ldm.model", "text_encoder_layer", "middle"),
    ("ldm.model", "text_encoder_max_length", 1000),
    ("ldm.tokenizer", None, "{"),
    ("ldm.tokenizer", "merges", 3),
]


@pytest.mark.parametrize(("entry", "key", "value"), HEADER_CASES, ids=[f"{e}-{k}-{v}" for e, k, v in HEADER_CASES])
def test_a_bad_sd_file_metadata_value_names_the_file_entry_and_key(saved, tmp_path, entry, key, value):
    path = _copy(saved, "sd", tmp_path)
    _edit_header(path, entry, key, value)
    with pytest.raises(ConfigError) as info:
        load_components(path)
    message = str(info.value)
    assert f"{path} (safetensors header {entry})" in message, message
    if key is not None:
        assert key in message, message


# (key of the hyper-parameters, value) of a Lightning checkpoint; "." goes into a group.
HPARAM_CASES = [
    ("unet.model_channels", "16"),
    ("unet.channel_mult", 2),
    ("unet.num_res_blocks", -1),
    ("unet", [16, 32]),
    ("text_encoder_config.num_heads", 0),
    ("text_encoder_config.hidden_size", "16"),
    ("objective.num_timesteps", -1),
    ("objective.beta_start", NAN),
    ("objective.schedule", "quadratic"),
    ("objective", [1, 2]),
    ("prediction_type", "sample"),
    ("lora_rank", -1),
    ("train_text_encoder", "yes"),
]


@pytest.mark.parametrize(("key", "value"), HPARAM_CASES, ids=[f"{k}-{v}" for k, v in HPARAM_CASES])
def test_a_bad_checkpoint_hyper_parameter_names_the_file_and_key(saved, tmp_path, key, value):
    path = _copy(saved, "ckpt", tmp_path)
    ckpt = torch.load(path, weights_only=True)
    _set(ckpt["hyper_parameters"], key, value)
    torch.save(ckpt, path)
    with pytest.raises(ConfigError) as info:
        load_components(path)
    message = str(info.value)
    assert f"{path} (hyper_parameters)" in message and key in message, message


@pytest.mark.parametrize("size", [1e9, 10**9, 0, "32"])
def test_a_bad_checkpoint_image_size_names_the_file(saved, tmp_path, size):
    path = _copy(saved, "ckpt", tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["ldm_image_size"] = size
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: ldm_image_size: got"):
        load_components(path)


@pytest.mark.parametrize(("key", "value"), [(None, "{"), ("unet.r", "2"), ("unet.r", 0), ("unet.lora_alpha", NAN)])
def test_a_bad_lora_metadata_value_names_the_file_and_key(saved, tmp_path, key, value):
    path = _copy(saved, "lora", tmp_path)
    _edit_header(path, "lora_adapter_metadata", key, value, dotted=False)
    with pytest.raises(ConfigError) as info:
        _load_lora(path)
    assert f"{path} (safetensors header lora_adapter_metadata)" in str(info.value) and (key or "JSON") in str(info.value)


def test_a_unet_config_that_leaves_out_a_shape_key_names_it_when_the_weights_disagree(saved, tmp_path):
    """Old exports wrote only the UNet arguments given, so a missing shape key takes UNetConfig's default; when the
    weights say otherwise, the error names the file and the keys left out, before the module is allocated."""
    root = _copy(saved, "ours", tmp_path)
    _edit_json(root / "unet" / "config.json", "num_res_blocks", DELETE)  # 1 in the weights, 2 by default
    with pytest.raises(ValueError, match=rf"{re.escape(str(root / 'unet' / 'config.json'))} does not describe its weights.*"
                                         r"leaves out \[.*'num_res_blocks'"):
        load_components(root)
    _edit_json(root / "unet" / "config.json", "model_channels", DELETE)  # 320 by default: never allocated
    with pytest.raises(ValueError, match="model_channels"):
        load_components(root)


def test_a_diffusers_config_that_does_not_describe_its_weights_names_the_file(saved, tmp_path):
    root = _copy(saved, "diffusers", tmp_path)
    _edit_json(root / "unet" / "config.json", "layers_per_block", 2)
    with pytest.raises(ValueError, match=rf"{re.escape(str(root / 'unet' / 'config.json'))} does not describe its weights"):
        load_components(root)


def test_diffusers_defaults_fill_in_what_a_diffusers_config_leaves_out(saved, tmp_path):
    root = _copy(saved, "diffusers", tmp_path)
    _edit_json(root / "scheduler" / "scheduler_config.json", "prediction_type", DELETE)
    _edit_json(root / "vae" / "config.json", "scaling_factor", DELETE)
    parts = load_components(root)
    assert parts.prediction_type == "epsilon" and math.isclose(parts.scaling_factor, 0.18215)


def test_the_legacy_folders_still_load_with_their_sample_size():
    legacy = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_v0"
    parts = load_components(legacy / "model")
    assert parts.sample_size == 32 and parts.scaling_factor == 0.5 and parts.unet_config.num_heads == 8
