"""UNet key maps and configurations: diffusers ``UNet2DConditionModel`` <-> our (CompVis-named) ``UNetModel``.

Transformer internals (``norm``, ``proj_in``, ``transformer_blocks.*``, ``proj_out``) have the same
names and shapes in both layouts; only block paths and ResBlock layer names differ, so the maps are a
table of module prefixes built from the configuration, applied in either direction. No tensor is
reshaped: diffusers keeps SD v1's 1x1-conv ``proj_in``/``proj_out`` and SD v2's linear ones as they are.

Example:
    >>> config = unet_config_from_diffusers(read_json_config("unet/config.json"), source="unet/config.json")
    >>> unet = UNetModel(**config)
    >>> unet.load_state_dict(diffusers_to_ldm_unet(diffusers_state, config))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ldm.formats._prefix_map import invert, rename_by_prefix, rename_path
from ldm.nn.configs import ConfigError, UNetConfig, check_value, positive

_DEFAULTS = UNetConfig().to_dict()

# diffusers ResnetBlock2D layer -> CompVis ResBlock layer.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _arg(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, _DEFAULTS[name])


def _attention_levels(config: Mapping[str, Any]) -> list[bool]:
    """Whether each level of a UNet with this (our) configuration has transformers."""
    levels = len(tuple(_arg(config, "channel_mult")))
    attn = set(_arg(config, "attention_resolutions"))
    depth = _arg(config, "transformer_depth")
    per_level = tuple(depth) if isinstance(depth, (list, tuple)) else (depth,) * levels
    return [2**level in attn and bool(per_level[level]) for level in range(levels)]


def _unet_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> ours, for every module of a UNet with this (our) configuration."""
    nrb = int(_arg(config, "num_res_blocks"))
    attention = _attention_levels(config)
    levels = len(attention)
    table = {
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's vector conditioning (text_time)
        "add_embedding.linear_2.": "label_emb.0.2.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }

    def resnet(theirs: str, ours: str) -> None:
        for a, b in _RESNET.items():
            table[f"{theirs}.{a}."] = f"{ours}.{b}."

    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    for level in range(levels):
        has_attn = attention[level]
        for j in range(nrb):
            idx = 1 + level * (nrb + 1) + j
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{idx}.0")
            if has_attn:
                table[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{idx}.1."
        if level != levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{1 + level * (nrb + 1) + nrb}.0.op."
    for i in range(levels):  # up_blocks.0 is the lowest resolution
        level = levels - 1 - i
        has_attn = attention[level]
        for j in range(nrb + 1):
            idx = i * (nrb + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0")
            if has_attn:
                table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{idx}.1."
        if level != 0:
            table[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (nrb + 1) + nrb}.{2 if has_attn else 1}.conv."
    return table


def diffusers_to_ldm_unet(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to our ``UNetModel`` names.

    Args:
        state_dict: diffusers UNet weights.
        config: Our ``UNetModel`` keyword arguments (``num_res_blocks``, ``channel_mult``,
            ``attention_resolutions``; missing ones take ``UNetModel``'s defaults), e.g. from
            :func:`unet_config_from_diffusers`.

    Raises:
        KeyError: naming keys that do not fit the configuration.
    """
    return rename_by_prefix(state_dict, _unet_prefixes(config), "diffusers UNet")


def ldm_to_diffusers_unet(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename our ``UNetModel`` state dict to diffusers names; the exact inverse of :func:`diffusers_to_ldm_unet`."""
    return rename_by_prefix(state_dict, invert(_unet_prefixes(config)), "ldm UNet")


def ldm_to_diffusers_unet_names(names: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module paths (or parameter keys) of our ``UNetModel`` ones; names the map does not cover are left out.

    Args:
        names: Our module paths, e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``.
        config: Our ``UNetModel`` keyword arguments, as for :func:`diffusers_to_ldm_unet`.
    """
    return _rename_paths(names, invert(_unet_prefixes(config)))


def diffusers_to_ldm_unet_names(names: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """Our module paths (or parameter keys) of diffusers ``UNet2DConditionModel`` ones; the inverse of
    :func:`ldm_to_diffusers_unet_names` (names it does not cover are left out)."""
    return _rename_paths(names, _unet_prefixes(config))


def _rename_paths(names: Iterable[str], table: Mapping[str, str]) -> dict[str, str]:
    return {name: new for name in names if (new := rename_path(name, table)) is not None}


def unet_config_of(unet: torch.nn.Module) -> dict[str, Any]:
    """The block-layout keyword arguments of a built ``UNetModel`` (what the key maps need)."""
    return {
        "num_res_blocks": unet.num_res_blocks,
        "channel_mult": unet.channel_mult,
        "attention_resolutions": unet.attention_resolutions,
        "transformer_depth": unet.config.transformer_depth,
    }


_UNSUPPORTED_IF_SET = (
    "class_embed_type",
    "encoder_hid_dim",
    "time_cond_proj_dim",
    "num_class_embeds",
)


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ConfigError(name, f"has {len(value)} entries for {levels} levels (block_out_channels)")
        return [int(v) for v in value]
    return [int(value)] * levels


# diffusers UNet2DConditionModel keys read here: annotation and diffusers' default (None: no default used here).
_DIFFUSERS_TYPES: dict[str, tuple[Any, Any]] = {
    "in_channels": (int, 4),
    "out_channels": (int, 4),
    "block_out_channels": (tuple[int, ...], (320, 640, 1280, 1280)),
    "down_block_types": (tuple[str, ...], None),
    "up_block_types": (tuple[str, ...], None),
    "layers_per_block": (int, 2),
    "cross_attention_dim": (int | None, 1280),
    "attention_head_dim": (int | tuple[int, ...], 8),
    "num_attention_heads": (int | tuple[int, ...] | None, None),
    "transformer_layers_per_block": (int | tuple[int, ...], 1),
    "addition_embed_type": (str | None, None),
    "addition_time_embed_dim": (int | None, None),
    "projection_class_embeddings_input_dim": (int | None, None),
    "use_linear_projection": (bool, False),
    "norm_num_groups": (int, 32),
}
DIFFUSERS_UNET_KEYS = tuple(_DIFFUSERS_TYPES)  # the shape keys read from a diffusers config.json
# Our UNetConfig field -> the diffusers key it comes from (for errors found on our side).
_DIFFUSERS_NAMES = {"model_channels": "block_out_channels", "channel_mult": "block_out_channels",
                    "num_res_blocks": "layers_per_block", "context_dim": "cross_attention_dim",
                    "transformer_depth": "transformer_layers_per_block", "norm_groups": "norm_num_groups",
                    "num_heads": "attention_head_dim", "num_head_channels": "attention_head_dim",
                    "use_linear_in_transformer": "use_linear_projection", "attention_resolutions": "down_block_types",
                    "transformer_depth_middle": "transformer_layers_per_block",
                    "adm_in_channels": "projection_class_embeddings_input_dim"}


def _diffusers_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of :data:`_DIFFUSERS_TYPES` in ``cfg`` (diffusers' defaults for the ones left out), type-checked;
    counts > 0."""
    out: dict[str, Any] = {}
    for key, (hint, default) in _DIFFUSERS_TYPES.items():
        value = check_value(key, cfg[key] if key in cfg else default, hint)
        if key not in ("down_block_types", "up_block_types", "addition_embed_type") and value is not None \
                and not isinstance(value, bool):
            problem = positive(value)
            if problem or (isinstance(value, tuple) and not value):
                raise ConfigError(key, problem or "got an empty list; expected one value > 0 per level")
        out[key] = value
    return out


def unet_config_from_diffusers(diffusers_config: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Our ``UNetModel`` keyword arguments from a diffusers ``unet/config.json`` (SD v1/v2 layouts).

    diffusers' ``attention_head_dim`` is (for historical reasons) the number of heads: an int means
    the same head count at every level (SD v1: 8 -> ``num_heads=8``); a list gives heads per level,
    which SD v2 chooses so that every head is 64 wide (-> ``num_head_channels=64``). Keys the config leaves
    out take ``UNet2DConditionModel``'s defaults, as diffusers itself would.

    Args:
        diffusers_config: The diffusers config.
        source: Where it comes from (the file), named by every error.

    Raises:
        ConfigError: (a ValueError) naming ``source`` and diffusers' key, for values of the wrong type or out of
            range and for configurations our UNet cannot express (class/addition embeddings, attention in some
            levels of the way up but not the mirrored ones down, unequal head widths, ...).
    """
    try:
        return _unet_config_from_diffusers(diffusers_config)
    except ConfigError as error:
        raise error.located(source, rename=_DIFFUSERS_NAMES) from None


def _unet_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(diffusers_config, Mapping):
        raise ConfigError(None, f"a diffusers UNet config is an object, got {type(diffusers_config).__name__}")
    cfg = dict(diffusers_config)
    for key in _UNSUPPORTED_IF_SET:
        if cfg.get(key) is not None:
            raise ConfigError(key, f"set to {cfg[key]!r}, which ldm's UNetModel does not support")
    checks = {
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "norm_eps": 1e-5,
    }
    for key, expected in checks.items():
        if key in cfg and cfg[key] is not None and cfg[key] != expected:
            raise ConfigError(key, f"set to {cfg[key]!r}; ldm's UNetModel needs {expected!r}")
    if isinstance(cfg.get("cross_attention_dim"), (list, tuple)):
        raise ConfigError("cross_attention_dim", "a per-level cross_attention_dim is not supported")
    v = _diffusers_values(cfg)
    if v["cross_attention_dim"] is None:
        raise ConfigError("cross_attention_dim", "null: only text-conditional UNets are supported")

    channels = list(v["block_out_channels"])
    levels = len(channels)
    base = channels[0]
    if any(c % base for c in channels):
        raise ConfigError("block_out_channels", f"{channels} are not multiples of the first level's {base}")
    down = list(v["down_block_types"] or ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"])
    up = list(v["up_block_types"] or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1))
    for key, types in (("down_block_types", down), ("up_block_types", up)):
        if len(types) != levels:
            raise ConfigError(key, f"has {len(types)} entries for the {levels} levels of block_out_channels")
    has_attn = [t.startswith("CrossAttn") for t in down]
    if [t.startswith("CrossAttn") for t in reversed(up)] != has_attn:
        raise ConfigError("up_block_types", f"{up} do not mirror down_block_types {down}")

    heads_value = v["num_attention_heads"] or v["attention_head_dim"]
    layers = _per_level(v["transformer_layers_per_block"], levels, "transformer_layers_per_block")
    attention_depths = {d for d, a in zip(layers, has_attn) if a}
    middle = layers[-1]  # diffusers' mid block takes the last level's count
    if len(attention_depths) <= 1 and attention_depths <= {middle}:
        depth: int | tuple[int, ...] = middle
        depth_middle = None
    else:  # SDXL: [1, 2, 10] over (DownBlock2D, CrossAttn..., CrossAttn...) -> (0, 2, 10)
        depth = tuple(d if a else 0 for d, a in zip(layers, has_attn))
        depth_middle = None if depth[-1] == middle else middle
    adm_in_channels = time_embed_dim = None
    if v["addition_embed_type"] is not None:
        if v["addition_embed_type"] != "text_time":
            raise ConfigError("addition_embed_type", f"set to {v['addition_embed_type']!r}; ldm's UNetModel supports "
                                                     "'text_time' (SDXL) only")
        adm_in_channels, time_embed_dim = v["projection_class_embeddings_input_dim"], v["addition_time_embed_dim"]
        if adm_in_channels is None or time_embed_dim is None:
            raise ConfigError("projection_class_embeddings_input_dim", "addition_embed_type 'text_time' needs it and "
                                                                       "addition_time_embed_dim")

    out: dict[str, Any] = dict(
        in_channels=v["in_channels"],
        out_channels=v["out_channels"],
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=v["layers_per_block"],
        attention_resolutions=tuple(2**i for i, a in enumerate(has_attn) if a),
        context_dim=v["cross_attention_dim"],
        transformer_depth=depth,
        use_linear_in_transformer=v["use_linear_projection"],
        norm_groups=v["norm_num_groups"],
    )
    if isinstance(heads_value, (list, tuple)):
        heads = _per_level(heads_value, levels, "attention_head_dim")
        widths = {channels[i] // heads[i] for i in range(levels) if has_attn[i]} | {channels[-1] // heads[-1]}
        if len(widths) != 1 or any(channels[i] % heads[i] for i in range(levels)):
            raise ConfigError("attention_head_dim", f"{list(heads_value)} gives unequal head widths for {channels}")
        out.update(num_heads=-1, num_head_channels=widths.pop())
    else:
        out.update(num_heads=int(heads_value), num_head_channels=-1)
    if depth_middle is not None:
        out["transformer_depth_middle"] = depth_middle
    if adm_in_channels is not None:
        out.update(adm_in_channels=adm_in_channels, addition_time_embed_dim=time_embed_dim)
    UNetConfig.from_dict(out)  # the remaining range and cross-field checks (errors renamed to diffusers' keys)
    return out


def unet_config_to_diffusers(config: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config (no ``_class_name``) for our ``UNetModel`` kwargs.

    Args:
        config: Our ``UNetModel`` keyword arguments (defaults filled in from ``UNetModel``).
        sample_size: Latent size recorded as ``sample_size`` (64 for SD v1 at 512 px); omitted if ``None``.

    Raises:
        ValueError: for an unconditional UNet (diffusers' conditional UNet needs ``cross_attention_dim``).
    """
    c = {**_DEFAULTS, **config}
    if c["context_dim"] is None:
        raise ValueError("an unconditional UNet (context_dim=None) has no diffusers UNet2DConditionModel equivalent")
    mults = list(c["channel_mult"])
    if mults[0] != 1:
        raise ValueError(f"diffusers' UNet needs channel_mult[0] == 1 (conv_in width = first level width), got {mults}")
    channels = [c["model_channels"] * m for m in mults]
    attn = _attention_levels(c)
    depth = c["transformer_depth"]
    layers = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(mults)
    middle = c.get("transformer_depth_middle") or layers[-1]
    layers = [d if a else 1 for d, a in zip(layers, attn)]  # a level without transformers: diffusers ignores it
    if middle != layers[-1]:
        if attn[-1]:
            raise ValueError(f"diffusers' UNet gives its mid block the last level's transformer count ({layers[-1]}); "
                             f"transformer_depth_middle={middle} differs")
        layers[-1] = middle
    if c["num_head_channels"] == -1:
        heads: int | list[int] = int(c["num_heads"])
    else:
        heads = [ch // c["num_head_channels"] for ch in channels]
    out: dict[str, Any] = {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": c["num_res_blocks"],
        "cross_attention_dim": c["context_dim"],
        "attention_head_dim": heads,
        "use_linear_projection": bool(c["use_linear_in_transformer"]),
        "transformer_layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "norm_num_groups": c["norm_groups"],
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
    }
    if c.get("adm_in_channels") is not None:
        out.update(addition_embed_type="text_time", addition_time_embed_dim=c["addition_time_embed_dim"],
                   projection_class_embeddings_input_dim=c["adm_in_channels"])
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out
