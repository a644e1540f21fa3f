"""VAE key maps and configurations: diffusers ``AutoencoderKL`` <-> our ``KLAutoencoder`` (SD ``first_stage_model`` names).

The differences are block paths (``down.0.block.0`` <-> ``down_blocks.0.resnets.0``), the decoder's
level order (our ``up.0`` is the highest resolution, diffusers' ``up_blocks.0`` the lowest), a few layer
names (``nin_shortcut`` <-> ``conv_shortcut``, ``norm_out`` <-> ``conv_norm_out``) and the mid-block
attention, whose 1x1 convs ``q/k/v/proj_out`` ([C, C, 1, 1]) are diffusers Linear layers
``to_q/to_k/to_v/to_out.0`` ([C, C]). Old diffusers files name those ``query/key/value/proj_attn``;
they are read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.formats._prefix_map import invert, rename_by_prefix
from ldm.nn.configs import AutoencoderConfig, ConfigError, check_value, positive

_DEFAULTS = AutoencoderConfig().to_dict()
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


def _arg(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, _DEFAULTS[name])


def _vae_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> ours for every module of a VAE with this (our) configuration."""
    if tuple(_arg(config, "attn_resolutions")):
        raise ValueError("VAE key maps support SD's layout only: attn_resolutions must be empty (mid-block attention only)")
    levels = len(tuple(_arg(config, "ch_mult")))
    nrb = int(_arg(config, "num_res_blocks"))
    table = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = f"{part}.conv_in."
        table[f"{part}.conv_out."] = f"{part}.conv_out."
        table[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        for a, b in _ATTN.items():
            table[f"{part}.mid_block.attentions.0.{a}."] = f"{part}.mid.attn_1.{b}."
        for j, ours in enumerate(("block_1", "block_2")):
            for a, b in _RESNET.items():
                table[f"{part}.mid_block.resnets.{j}.{a}."] = f"{part}.mid.{ours}.{b}."

    for i in range(levels):
        for j in range(nrb):
            for a, b in _RESNET.items():
                table[f"encoder.down_blocks.{i}.resnets.{j}.{a}."] = f"encoder.down.{i}.block.{j}.{b}."
        if i != levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        level = levels - 1 - i  # diffusers' up_blocks.i is our up.(levels - 1 - i)
        for j in range(nrb + 1):
            for a, b in _RESNET.items():
                table[f"decoder.up_blocks.{i}.resnets.{j}.{a}."] = f"decoder.up.{level}.block.{j}.{b}."
        if level != 0:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{level}.upsample.conv."
    return table


def _is_attention_projection(key: str) -> bool:
    return ".mid.attn_1." in key and key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and key.endswith(".weight")


def diffusers_to_ldm_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a diffusers ``AutoencoderKL`` state dict to our ``KLAutoencoder`` names.

    Args:
        state_dict: diffusers VAE weights (current or legacy attention names).
        config: Our ``KLAutoencoder`` keyword arguments (``ch_mult``, ``num_res_blocks``; missing ones
            take the defaults, which are SD's), e.g. from :func:`vae_config_from_diffusers`.

    Raises:
        KeyError: naming keys that do not fit the configuration.
    """
    modern: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        head, _, tail = key.rpartition(".")
        for old, new in _LEGACY_ATTN.items():
            if head.endswith(f"mid_block.attentions.0.{old}"):
                head = head[: -len(old)] + new
        modern[f"{head}.{tail}"] = value

    def to_conv(old: str, new: str, value: torch.Tensor) -> torch.Tensor:
        return value.reshape(*value.shape, 1, 1) if _is_attention_projection(new) and value.ndim == 2 else value

    return rename_by_prefix(modern, _vae_prefixes(config), "diffusers VAE", to_conv)


def ldm_to_diffusers_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename our ``KLAutoencoder`` state dict to diffusers names; the inverse of :func:`diffusers_to_ldm_vae`."""

    def to_linear(old: str, new: str, value: torch.Tensor) -> torch.Tensor:
        return value.reshape(value.shape[:2]) if _is_attention_projection(old) and value.ndim == 4 else value

    return rename_by_prefix(state_dict, invert(_vae_prefixes(config)), "ldm VAE", to_linear)


# diffusers AutoencoderKL keys read here: annotation and diffusers' default (None: no default used here).
_DIFFUSERS_TYPES: dict[str, tuple[Any, Any]] = {
    "in_channels": (int, 3),
    "out_channels": (int, 3),
    "block_out_channels": (tuple[int, ...], (64,)),
    "down_block_types": (tuple[str, ...], None),
    "up_block_types": (tuple[str, ...], None),
    "layers_per_block": (int, 1),
    "latent_channels": (int, 4),
    "norm_num_groups": (int, 32),
    "sample_size": (int | tuple[int, ...] | None, None),
    "mid_block_add_attention": (bool, True),
}
DIFFUSERS_VAE_KEYS = tuple(_DIFFUSERS_TYPES)  # the shape keys read from a diffusers config.json
# Our AutoencoderConfig field -> the diffusers key it comes from (for errors found on our side).
_DIFFUSERS_NAMES = {"ch": "block_out_channels", "ch_mult": "block_out_channels", "num_res_blocks": "layers_per_block",
                    "resolution": "sample_size", "z_channels": "latent_channels", "embed_dim": "latent_channels",
                    "mid_attention": "mid_block_add_attention", "norm_groups": "norm_num_groups"}


def vae_config_from_diffusers(diffusers_config: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Our ``KLAutoencoder`` keyword arguments from a diffusers ``vae/config.json``; keys it leaves out take
    diffusers' ``AutoencoderKL`` defaults.

    The diffusers-only ``scaling_factor`` (0.18215 for SD) is not a ``KLAutoencoder`` argument;
    read it from the config yourself.

    Args:
        diffusers_config: The diffusers config.
        source: Where it comes from (the file), named by every error.

    Raises:
        ConfigError: (a ValueError) naming ``source`` and diffusers' key, for values of the wrong type or out of
            range and for layouts our autoencoder cannot express (attention inside levels, no quant convs, ...).
    """
    try:
        return _vae_config_from_diffusers(diffusers_config)
    except ConfigError as error:
        raise error.located(source, rename=_DIFFUSERS_NAMES) from None


def _vae_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(diffusers_config, Mapping):
        raise ConfigError(None, f"a diffusers VAE config is an object, got {type(diffusers_config).__name__}")
    cfg = dict(diffusers_config)
    v = {key: check_value(key, cfg[key] if key in cfg else default, hint) for key, (hint, default) in _DIFFUSERS_TYPES.items()}
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                "norm_num_groups", "sample_size"):
        problem = positive(v[key]) if v[key] is not None else None
        if problem or v[key] == ():
            raise ConfigError(key, problem or "got an empty list; expected one value > 0 per level")
    channels = list(v["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise ConfigError("block_out_channels", f"{channels} are not multiples of the first level's {base}")
    levels = len(channels)
    down = list(v["down_block_types"] or ["DownEncoderBlock2D"] * levels)
    up = list(v["up_block_types"] or ["UpDecoderBlock2D"] * levels)
    for key, types, expected in (("down_block_types", down, "DownEncoderBlock2D"), ("up_block_types", up, "UpDecoderBlock2D")):
        if any(t != expected for t in types):
            raise ConfigError(key, f"only DownEncoderBlock2D/UpDecoderBlock2D VAEs are supported, got {types}")
        if len(types) != levels:
            raise ConfigError(key, f"has {len(types)} entries for the {levels} levels of block_out_channels")
    for key, expected in {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True}.items():
        if cfg.get(key, expected) != expected:
            raise ConfigError(key, f"set to {cfg[key]!r}; ldm's KLAutoencoder needs {expected!r}")
    size = v["sample_size"]
    latent = v["latent_channels"]
    out = dict(
        in_channels=v["in_channels"],
        out_channels=v["out_channels"],
        ch=base,
        ch_mult=tuple(c // base for c in channels),
        num_res_blocks=v["layers_per_block"],
        attn_resolutions=(),
        resolution=(max(size) if isinstance(size, tuple) else size) or 256,
        z_channels=latent,
        embed_dim=latent,
        mid_attention=v["mid_block_add_attention"],
        norm_groups=v["norm_num_groups"],
    )
    AutoencoderConfig.from_dict(out)  # the remaining checks (errors renamed to diffusers' keys)
    return out


def vae_config_to_diffusers(config: Mapping[str, Any], scaling_factor: float = 0.18215) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config (no ``_class_name``) for our ``KLAutoencoder`` kwargs.

    Raises:
        ValueError: when ``embed_dim != z_channels`` or ``attn_resolutions`` is not empty.
    """
    c = {**_DEFAULTS, **config}
    if c["embed_dim"] != c["z_channels"]:
        raise ValueError(f"diffusers' AutoencoderKL needs embed_dim == z_channels, got {c['embed_dim']} and {c['z_channels']}")
    if tuple(c["attn_resolutions"]):
        raise ValueError("diffusers' AutoencoderKL (DownEncoderBlock2D) has no attention inside levels; attn_resolutions must be empty")
    if tuple(c["ch_mult"])[0] != 1:
        raise ValueError(f"diffusers' AutoencoderKL needs ch_mult[0] == 1 (conv_in width = first level width), got {c['ch_mult']}")
    levels = len(tuple(c["ch_mult"]))
    return {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [c["ch"] * m for m in c["ch_mult"]],
        "layers_per_block": c["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": c["z_channels"],
        "norm_num_groups": c["norm_groups"],
        "sample_size": c["resolution"],
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": bool(c["mid_attention"]),
    }


def vae_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], resolution: int = 256) -> dict[str, Any]:
    """Our ``KLAutoencoder`` keyword arguments inferred from its weights (SD ``first_stage_model.*`` names).

    Shapes give the channels, levels, blocks per level, latent width and where attention sits; the
    GroupNorm group count cannot be seen and is SD's 32 (and the dropout 0). ``resolution`` only places
    ``attn_resolutions`` (SD's VAE has attention in its middle block only).

    Raises:
        KeyError: naming the missing key when the weights are not a KL autoencoder's.
    """
    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise KeyError(f"VAE key {key!r} is missing: not an SD KL autoencoder ({len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})")
        return state_dict[key]

    conv_in = need("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
    ch_mult = []
    for level in range(levels):
        ch_mult.append(int(need(f"encoder.down.{level}.block.0.conv2.weight").shape[0]) // ch)
    num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block."))
    attn = [resolution // 2**level for level in range(levels) if f"encoder.down.{level}.attn.0.q.weight" in state_dict]
    return {
        "in_channels": in_channels,
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "ch": ch,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": tuple(attn),
        "resolution": resolution,
        "z_channels": int(need("decoder.conv_in.weight").shape[1]),
        "embed_dim": int(need("post_quant_conv.weight").shape[0]),
        "mid_attention": "encoder.mid.attn_1.q.weight" in state_dict,
    }
