"""Typed shapes of the models: one record per network, the only place its architecture knobs are listed.

The modules build from them (``KLAutoencoder(config)``, ``UNetModel(config)``), the format layer reads and writes
them (``from_dict``/``to_dict`` give the same JSON our model folders held before), and the LightningModules take
them as arguments, so ``ldm fit --help`` documents every field.

Every config checks itself when it is made: each field against its annotation (``int``, ``float``, ``bool``,
``str``, ``X | None``, ``tuple[int, ...]``; a bool is not an int, an int is a float, a list becomes a tuple) and
against its range (:attr:`Config._RULES`), raising :class:`ConfigError`, a ``ValueError`` that names the key, the
bad value and what is expected, and, for a config read from a file, the file (``from_dict(values, source=path)``).
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["SDXL_BASE_UNET", "UNetArchitecture", "AutoencoderConfig", "Config", "ConfigError", "TextEncoderConfig", "UNetConfig",
           "check_fields", "check_value"]

_C = TypeVar("_C", bound="Config")


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range.

    The message reads ``"<source>: <key>: <problem>"``: ``source`` is the file (or other origin) the values came
    from, ``key`` the offending key as that source spells it (``unet.model_channels`` inside a group).
    """

    def __init__(self, key: str | None, problem: str, source: str | None = None):
        self.key, self.problem, self.source = key, problem, source
        text = f"{key}: {problem}" if key else problem
        super().__init__(f"{source}: {text}" if source else text)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (DataLoader workers, DDP ranks) with its own arguments
        return type(self), (self.key, self.problem, self.source)

    def located(self, source: str | None = None, prefix: str | None = None,
                rename: Mapping[str, str] | None = None) -> ConfigError:
        """The same problem as read from ``source`` (kept when the error already names one), with the key renamed
        (``rename``: our field name -> the source's key) and put under ``prefix`` (a group: ``unet``)."""
        key = self.key
        if key is not None and rename:
            key = ", ".join(rename.get(k, k) for k in key.split(", "))
        if prefix:
            key = ", ".join(f"{prefix}.{k}" for k in key.split(", ")) if key else prefix
        return ConfigError(key, self.problem, self.source or source)


# ------------------------------------------------------------------------------------------------ type checks


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        names = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0]) if len(set(args)) == 1 else 'values'}"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "finite numbers", bool: "booleans", str: "strings"}.get(hint, _describe(hint))


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {dict: "an object", list: "a list", tuple: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value))
    if kind is None:
        kind = "an integer" if isinstance(value, numbers.Integral) else "a number" if isinstance(value, numbers.Real) \
            else f"a {type(value).__name__}"
    return f"{text} ({kind})" if value is not None else "null"


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(True, value as the field holds it)`` when ``value`` fits ``hint``, else ``(False, None)``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or hint is object:
        return True, value
    if origin in (Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        for arg in args:
            if arg is not type(None):
                ok, converted = _convert(value, arg)
                if ok:
                    return True, converted
        return False, None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, None
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, None
        out = []
        for item, item_hint in zip(value, items):
            ok, converted = _convert(item, item_hint)
            if not ok:
                return False, None
            out.append(converted)
        return True, tuple(out)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else None
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # a hint these checks do not know: left to the class


def check_value(key: str, value: Any, hint: Any) -> Any:
    """``value`` as a field annotated ``hint`` holds it (a list as a tuple, an int as a float where a float belongs).

    Raises:
        ConfigError: naming ``key``, the value and what was expected (non-finite numbers are no numbers).
    """
    ok, converted = _convert(value, hint)
    if not ok:
        raise ConfigError(key, f"got {_show(value)}; expected {_describe(hint)}")
    return converted


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass' fields (``from __future__ import annotations`` leaves strings)."""
    if cls not in _HINTS:
        hints = get_type_hints(cls)
        _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in fields(cls)}
    return _HINTS[cls]


def check_fields(cls: type, values: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """The entries of ``values`` that are fields of the dataclass ``cls``, each checked against its annotation (for
    dataclasses that are not a :class:`Config`, such as the sampler settings); other keys are left out.

    Raises:
        ConfigError: for a value of the wrong type, naming ``source`` and the key.
    """
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = _field_hints(cls)
    try:
        return {k: check_value(k, v, hints[k]) for k, v in values.items() if k in hints}
    except ConfigError as error:
        raise error.located(source) from None


# ------------------------------------------------------------------------------------------------ range rules

Rule = Callable[[Any], "str | None"]  # the problem with a (well-typed, not None) value, or None when it is fine


def _items(value: Any) -> Iterable[Any]:
    return value if isinstance(value, tuple) else (value,)


def positive(value: Any) -> str | None:
    """Every number (of a list too) > 0."""
    return None if all(v > 0 for v in _items(value)) else f"got {_show(value)}; expected {'values' if isinstance(value, tuple) else 'a value'} > 0"


def non_negative(value: Any) -> str | None:
    return None if all(v >= 0 for v in _items(value)) else f"got {_show(value)}; expected a value >= 0"


def levels(value: Any) -> str | None:
    """A non-empty list of positive multipliers (one per resolution level)."""
    if not value:
        return "got an empty list; expected one multiplier > 0 per resolution level"
    return positive(value)


def head_setting(value: Any) -> str | None:
    """-1 (unused) or a positive count."""
    return None if value == -1 or value > 0 else f"got {_show(value)}; expected a value > 0, or -1 (unused)"


def depths(value: Any) -> str | None:
    """One transformer depth > 0 for every level, or a list of depths >= 0 per level (0: no transformer there)."""
    if isinstance(value, tuple):
        if not value:
            return "got an empty list; expected one depth >= 0 per resolution level"
        return non_negative(value)
    return positive(value)


def probability(value: Any) -> str | None:
    """A dropout rate in [0, 1)."""
    return None if 0 <= value < 1 else f"got {_show(value)}; expected a value in [0, 1)"


@dataclass(frozen=True)
class Config:
    """Base of the typed configs (a dataclass without fields, so jsonargparse reads them as plain dataclasses).

    Subclasses list range checks in ``_RULES`` (field name -> rule: a function of the well-typed value returning
    the problem or None; None values of optional fields are not checked) and cross-field checks in
    ``__post_init__`` after ``super().__post_init__()``, raising :class:`ConfigError`.
    """

    _RULES: typing.ClassVar[Mapping[str, Rule]] = {}

    def __post_init__(self) -> None:
        hints = _field_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = check_value(f.name, getattr(self, f.name), hints[f.name])  # sequences as tuples: equal configs compare equal
            object.__setattr__(self, f.name, value)
            rule = self._RULES.get(f.name)
            problem = rule(value) if rule is not None and value is not None else None
            if problem:
                raise ConfigError(f.name, problem)

    @classmethod
    def from_dict(cls: type[_C], values: Mapping[str, Any], source: str | None = None,
                  required: Iterable[str] = ()) -> _C:
        """The config from a dict that may hold other keys too (``_class_name``, training settings, ...).

        Args:
            values: The fields (other keys are ignored).
            source: Where ``values`` come from (a file path); every error names it.
            required: Keys ``values`` must hold (no default is assumed for them): for a file, the fields its
                writers have always written.

        Raises:
            ConfigError: for ``values`` that are not a mapping, a missing required key, or a bad value.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(None, f"expected an object of {cls.__name__} fields, got {_show(values)}", source)
        missing = [k for k in required if k not in values]
        if missing:
            raise ConfigError(", ".join(missing), f"missing (required: no default is assumed for {'it' if len(missing) == 1 else 'them'})",
                              source)
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        try:
            return cls(**{k: v for k, v in values.items() if k in names})
        except ConfigError as error:
            raise error.located(source) from None

    @classmethod
    def coerce(cls: type[_C], value: _C | Mapping[str, Any], source: str | None = None) -> _C:
        """``value`` itself, or the config from a dict (a checkpoint's hyper-parameters, a test's arguments)."""
        return value if isinstance(value, cls) else cls.from_dict(value, source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (sequences as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}  # type: ignore[call-overload]

    def replace(self: _C, **changes: Any) -> _C:
        values = {**asdict(self), **changes}  # type: ignore[call-overload]
        return type(self).from_dict(values)


@dataclass(frozen=True)
class AutoencoderConfig(Config):
    """Shape of the KL autoencoder; the defaults are Stable Diffusion's VAE.

    Args:
        in_channels: Image channels.
        out_channels: Channels of the reconstruction; None: ``in_channels``.
        ch: Base channel width of encoder and decoder.
        ch_mult: Width multiplier per resolution level; ``len(ch_mult) - 1`` downsamplings, so
            ``[1, 2, 4]`` gives a factor-4 autoencoder (32x32 images -> 8x8 latents).
        num_res_blocks: Residual blocks per level (the decoder uses one more).
        attn_resolutions: Feature-map sizes (relative to ``resolution``) that get self-attention.
        resolution: Nominal training image size; only used to place ``attn_resolutions``.
        z_channels: Channels of the encoder's output (the latent before the 1x1 ``quant_conv``).
        embed_dim: Latent channels; None: ``z_channels``.
        dropout: Dropout inside residual blocks.
        mid_attention: Self-attention in the bottleneck (as in SD).
        norm_groups: GroupNorm groups (32 in SD); reduced automatically for narrow layers.
    """

    in_channels: int = 3
    out_channels: int | None = None
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int | None = None
    dropout: float = 0.0
    mid_attention: bool = True
    norm_groups: int = 32

    _RULES = {"in_channels": positive, "out_channels": positive, "ch": positive, "ch_mult": levels,
              "num_res_blocks": positive, "attn_resolutions": positive, "resolution": positive, "z_channels": positive,
              "embed_dim": positive, "dropout": probability, "norm_groups": positive}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", self.z_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# Range rules of the UNet's fields other than its channels (shared by UNetConfig and UNetArchitecture).
_UNET_SHAPE_RULES = {"model_channels": positive, "channel_mult": levels, "num_res_blocks": positive,
                     "attention_resolutions": positive, "num_heads": head_setting, "num_head_channels": head_setting,
                     "transformer_depth": depths, "transformer_depth_middle": positive, "adm_in_channels": positive,
                     "addition_time_embed_dim": positive, "dropout": probability, "norm_groups": positive}


def level_depths(config: Any) -> tuple[int, ...]:
    """Transformer blocks per attention layer at each level of a UNet config (0 where a level has no attention:
    not in ``attention_resolutions``, or depth 0)."""
    levels = len(config.channel_mult)
    depth = config.transformer_depth
    per_level = depth if isinstance(depth, tuple) else (depth,) * levels
    return tuple(d if 2**level in config.attention_resolutions else 0 for level, d in enumerate(per_level))


def middle_depth(config: Any) -> int:
    """Transformer blocks in the middle block: ``transformer_depth_middle``, else the last level's depth (as
    diffusers and SGM do)."""
    if config.transformer_depth_middle is not None:
        return config.transformer_depth_middle
    depth = config.transformer_depth
    return depth[-1] if isinstance(depth, tuple) else depth


def _check_unet_shape(config: Any) -> None:
    """``__post_init__`` of the UNet configs: the field checks, then the heads must split every attention block's
    channels (what ``UNetModel`` would otherwise refuse while building)."""
    Config.__post_init__(config)
    if isinstance(config.transformer_depth, tuple) and len(config.transformer_depth) != len(config.channel_mult):
        raise ConfigError("transformer_depth", f"has {len(config.transformer_depth)} entries for the "
                                               f"{len(config.channel_mult)} levels of channel_mult")
    if middle_depth(config) < 1:
        raise ConfigError("transformer_depth_middle", "the middle block needs at least one transformer block; the last "
                                                      "level's transformer_depth is 0, so set transformer_depth_middle")
    if (config.adm_in_channels is None) != (config.addition_time_embed_dim is None):
        raise ConfigError("adm_in_channels, addition_time_embed_dim", "set both (SDXL: 2816 and 256) or neither")
    if config.num_head_channels == -1 and config.num_heads == -1:
        raise ConfigError("num_heads", "num_heads and num_head_channels are both -1; set one of them > 0")
    widths = [config.model_channels * m for m, depth in zip(config.channel_mult, level_depths(config)) if depth]
    widths.append(config.model_channels * config.channel_mult[-1])  # the middle block's transformer
    for width in widths:
        if config.num_head_channels == -1 and width % config.num_heads:
            raise ConfigError("num_heads", f"{width} channels (model_channels * channel_mult) are not divisible by "
                                           f"num_heads={config.num_heads}")
        if config.num_head_channels != -1 and width % config.num_head_channels:
            raise ConfigError("num_head_channels", f"{width} channels (model_channels * channel_mult) are not divisible "
                                                   f"by num_head_channels={config.num_head_channels}")


@dataclass(frozen=True)
class UNetConfig(Config):
    """Shape of the conditional UNet; the defaults are SD v1.x (for v2.x: ``num_head_channels=64,
    context_dim=1024, use_linear_in_transformer=True``; for SDXL see :data:`SDXL_BASE_UNET`).

    Args:
        in_channels: Channels of the input latent.
        out_channels: Channels of the prediction.
        model_channels: Base width; level ``i`` has ``model_channels * channel_mult[i]`` channels and
            the timestep embedding has ``4 * model_channels``.
        channel_mult: Width multiplier per resolution level; the UNet downsamples
            ``len(channel_mult) - 1`` times.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: Downsampling factors (1 = full latent resolution, 2 = after one
            downsample, ...) whose levels get a SpatialTransformer after each ResBlock.
        num_heads: Attention heads per transformer when ``num_head_channels`` is -1 (SD v1: 8).
        num_head_channels: Channels per head (SD v2: 64); heads = channels // this. -1 to use
            ``num_heads`` instead.
        context_dim: Channels of the conditioning tokens (CLIP hidden size: 768 for SD v1, 1024 for
            SD v2). ``None`` builds an unconditional UNet whose ``attn2`` is a second self-attention
            (CompVis' behaviour); ``forward`` then takes no context.
        transformer_depth: BasicTransformerBlocks per SpatialTransformer: one count for every level, or
            one per level (SDXL: ``[0, 2, 10]``; 0 leaves a level without transformers).
        transformer_depth_middle: BasicTransformerBlocks of the middle block's transformer; None: the
            last level's ``transformer_depth`` (SDXL: 10).
        adm_in_channels: Width of the vector conditioning ``y`` added to the timestep embedding through
            ``label_emb`` (SDXL: 2816 = pooled text 1280 + 6 size/crop ids x 256); None: no vector input.
        addition_time_embed_dim: Width of the sinusoidal embedding of each SDXL size/crop id inside
            ``y`` (SDXL: 256); set exactly when ``adm_in_channels`` is.
        use_linear_in_transformer: Linear ``proj_in``/``proj_out`` on tokens (SD v2) instead of 1x1
            convs (SD v1).
        dropout: Dropout in ResBlocks and transformer blocks.
        norm_groups: GroupNorm groups (SD: 32); reduced to the largest divisor of a layer's channels
            for tiny models.
        use_checkpoint: Gradient checkpointing of every ResBlock and transformer block while grad is
            enabled (trades compute for memory).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int | None = 768
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    adm_in_channels: int | None = None
    addition_time_embed_dim: int | None = None
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    norm_groups: int = 32
    use_checkpoint: bool = False

    _RULES = {"in_channels": positive, "out_channels": positive, "context_dim": positive, **_UNET_SHAPE_RULES}
    __post_init__ = _check_unet_shape


SDXL_BASE_UNET = dict(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(2, 4),
                      num_heads=-1, num_head_channels=64, context_dim=2048, transformer_depth=(0, 2, 10),
                      adm_in_channels=2816, addition_time_embed_dim=256, use_linear_in_transformer=True)
"""``UNetConfig`` fields of the SDXL 1.0 base UNet (SGM's ``sd_xl_base.yaml``): 2,567,463,684 parameters."""


@dataclass(frozen=True)
class TextEncoderConfig(Config):
    """Shape of a small, newly built CLIP text model (the demo's; a pretrained CLIP brings its own).

    Args:
        hidden_size: Width of the model, which is the cross-attention context dimension.
        num_layers: Transformer layers.
        num_heads: Attention heads; must divide ``hidden_size``.
        intermediate_size: MLP width; None: ``4 * hidden_size``.
        max_length: Sequence length, also the number of position embeddings.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int | None = None
    max_length: int = 77

    _RULES = {"hidden_size": positive, "num_layers": positive, "num_heads": positive, "intermediate_size": positive,
              "max_length": positive}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ConfigError("num_heads", f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")


# The channels a UNet on a given VAE and text encoder must have: a run fills them in from those, so its ``unet``
# argument (``LatentDiffusion(unet=...)``) takes the other fields only.
UNET_DERIVED_FIELDS = ("in_channels", "out_channels", "context_dim")
UNetArchitecture = make_dataclass(
    "UNetArchitecture",
    [(f.name, f.type, field(default=f.default)) for f in fields(UNetConfig) if f.name not in UNET_DERIVED_FIELDS],
    bases=(Config,),
    frozen=True,
    namespace={"__module__": __name__, "_RULES": _UNET_SHAPE_RULES, "__post_init__": _check_unet_shape,
               "__doc__": (UNetConfig.__doc__ or "").replace(
        "Shape of the conditional UNet", "Shape of a run's UNet without the channels its VAE and text encoder set "
        "(``in_channels``, ``out_channels``, ``context_dim``); the rest of :class:`UNetConfig`", 1)},
)
