"""Typed shapes of the models: one record per network, the only place its architecture knobs are listed.

The modules build from them (``KLAutoencoder(config)``, ``UNetModel(config)``), the format layer reads and writes
them (``from_dict``/``to_dict`` give the same JSON our model folders held before), and the LightningModules take
them as arguments, so ``ldm fit --help`` documents every field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any, TypeVar

__all__ = ["UNetArchitecture", "AutoencoderConfig", "Config", "TextEncoderConfig", "UNetConfig"]

_C = TypeVar("_C", bound="Config")


@dataclass(frozen=True)
class Config:
    """Base of the typed configs (a dataclass without fields, so jsonargparse reads them as plain dataclasses)."""

    def __post_init__(self) -> None:  # sequences as tuples, so equal configs compare equal whatever they came from
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def from_dict(cls: type[_C], values: Mapping[str, Any]) -> _C:
        """The config from a dict that may hold other keys too (``_class_name``, training settings, ...)."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def coerce(cls: type[_C], value: _C | Mapping[str, Any]) -> _C:
        """``value`` itself, or the config from a dict (a checkpoint's hyper-parameters, a test's arguments)."""
        return value if isinstance(value, cls) else cls.from_dict(value)

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", self.z_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class UNetConfig(Config):
    """Shape of the conditional UNet; the defaults are SD v1.x (for v2.x: ``num_head_channels=64,
    context_dim=1024, use_linear_in_transformer=True``).

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
        transformer_depth: BasicTransformerBlocks per SpatialTransformer.
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
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    norm_groups: int = 32
    use_checkpoint: bool = False


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")


# The channels a UNet on a given VAE and text encoder must have: a run fills them in from those, so its ``unet``
# argument (``LatentDiffusion(unet=...)``) takes the other fields only.
UNET_DERIVED_FIELDS = ("in_channels", "out_channels", "context_dim")
UNetArchitecture = make_dataclass(
    "UNetArchitecture",
    [(f.name, f.type, field(default=f.default)) for f in fields(UNetConfig) if f.name not in UNET_DERIVED_FIELDS],
    bases=(Config,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": (UNetConfig.__doc__ or "").replace(
        "Shape of the conditional UNet", "Shape of a run's UNet without the channels its VAE and text encoder set "
        "(``in_channels``, ``out_channels``, ``context_dim``); the rest of :class:`UNetConfig`", 1)},
)
