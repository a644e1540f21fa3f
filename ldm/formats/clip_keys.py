"""Text-encoder key maps: SD single-file layouts <-> ``transformers.CLIPTextModel``.

* SD v1 (``FrozenCLIPEmbedder``): ``cond_stage_model.transformer.text_model.*`` is a transformers CLIP
  text model saved by transformers v4, whose keys carry a ``text_model.`` prefix. transformers v5's
  ``CLIPTextModel`` has no such prefix; :func:`clip_state_prefix` says which one is installed and the
  maps add or remove it. ``embeddings.position_ids`` (a v4 buffer) is dropped.
* SD v2 (``FrozenOpenCLIPEmbedder``): ``cond_stage_model.model.*`` is an OpenCLIP text tower with fused
  ``attn.in_proj_weight`` (q, k, v stacked), ``ln_1/ln_2``, ``mlp.c_fc/c_proj``, ``token_embedding``,
  ``positional_embedding``, ``ln_final`` and ``text_projection``. It maps onto a ``CLIPTextModel``
  with ``hidden_act="gelu"``; :func:`openclip_to_transformers` also returns that config.
* SDXL's OpenCLIP bigG (``conditioner.embedders.1.model.*``) is the same layout with its ``text_projection``, a
  ``(width, projection)`` matrix applied as ``x @ text_projection``: a ``CLIPTextModelWithProjection``'s
  ``text_projection.weight`` is its transpose (:func:`openclip_to_transformers_with_projection` and back).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SD_V1_PREFIX = "transformer.text_model."
_DROPPED_V1 = ("embeddings.position_ids",)
_OPENCLIP_DROPPED = ("text_projection", "logit_scale", "attn_mask")
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}


@lru_cache(maxsize=1)
def clip_state_prefix() -> str:
    """``"text_model."`` if the installed transformers' ``CLIPTextModel`` keys carry it (v4), else ``""`` (v5)."""
    config = CLIPTextConfig(
        vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    with torch.device("meta"):
        keys = CLIPTextModel(config).state_dict().keys()
    return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


@lru_cache(maxsize=1)
def projection_state_prefix() -> str:
    """The prefix of the text tower's keys in the installed ``CLIPTextModelWithProjection`` (``"text_model."``; it
    kept that level when transformers v5 flattened ``CLIPTextModel``)."""
    config = CLIPTextConfig(
        vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=4,
    )  # fmt: skip
    with torch.device("meta"):
        keys = CLIPTextModelWithProjection(config).state_dict().keys()
    return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def transformers_to_diffusers_clip_name(name: str) -> str:
    """A ``CLIPTextModel`` module path or key (v4 or v5) as diffusers writes it: with the ``text_model.`` level."""
    return "text_model." + _strip(name, "text_model.")


def diffusers_to_transformers_clip_name(name: str) -> str:
    """A diffusers text-encoder module path or key (with or without ``text_model.``) in the installed ``CLIPTextModel``."""
    return clip_state_prefix() + _strip(name, "text_model.")


def sd_v1_clip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD v1 ``cond_stage_model.*`` weights (with or without that prefix) -> installed ``CLIPTextModel`` keys.

    Raises:
        KeyError: for keys outside ``transformer.text_model.`` (e.g. an OpenCLIP layout).
    """
    target = clip_state_prefix()
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        key = _strip(key, "cond_stage_model.")
        if not key.startswith(SD_V1_PREFIX):
            unknown.append(key)
            continue
        key = key[len(SD_V1_PREFIX) :]
        if key not in _DROPPED_V1:
            out[target + key] = value
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) are not SD v1 CLIP ('{SD_V1_PREFIX}*') keys, e.g. {unknown[:5]}")
    return out


def transformers_to_sd_v1_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` weights (v4 or v5 keys) -> SD v1 layout ``transformer.text_model.*`` (no ``cond_stage_model.``)."""
    return {SD_V1_PREFIX + _strip(k, "text_model."): v for k, v in state_dict.items() if _strip(k, "text_model.") not in _DROPPED_V1}


def openclip_to_transformers(
    state_dict: Mapping[str, torch.Tensor], head_width: int = 64, drop_last_layers: int = 0
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig]:
    """An OpenCLIP text tower (SD v2 ``cond_stage_model.model.*``, prefix optional) -> ``CLIPTextModel`` weights and config.

    Args:
        state_dict: OpenCLIP weights; ``visual.*``, ``text_projection``, ``logit_scale`` and
            ``attn_mask`` are ignored (a ``CLIPTextModel`` has no projection).
        head_width: Channels per attention head (OpenCLIP uses 64; heads = width // 64; one head for a width
            that is not a multiple).
        drop_last_layers: Leave out this many final transformer layers. SD v2 conditions on the
            penultimate layer: ``drop_last_layers=1`` with the last hidden state (after the final
            layer norm) is what diffusers' SD v2 text encoders hold; keeping all layers and asking
            ``TextEncoder`` for ``layer="penultimate"`` gives the same context.

    Returns:
        ``(state_dict, config)`` ready for ``CLIPTextModel(config).load_state_dict(state_dict)``.

    Raises:
        KeyError: for keys that are not OpenCLIP text-tower keys.
    """
    prefix = clip_state_prefix()
    src = {_strip(_strip(k, "cond_stage_model."), "model."): v for k, v in state_dict.items()}
    src = {k: v for k, v in src.items() if not k.startswith("visual.") and k not in _OPENCLIP_DROPPED}
    layers = 1 + max((int(m[1]) for k in src if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))), default=-1)
    keep = layers - drop_last_layers
    if layers == 0 or keep < 1:
        raise KeyError(f"no OpenCLIP transformer.resblocks.* keys to keep (found {layers} layers, dropping {drop_last_layers})")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in src.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:  # including the fused attn.in_proj_{weight,bias}, split below
            unknown.append(key)
            continue
        n, name, kind = int(m[1]), m[2], m[3]
        if n >= keep:
            continue
        base = f"{prefix}encoder.layers.{n}."
        if name in _OPENCLIP_LAYER:
            out[f"{base}{_OPENCLIP_LAYER[name]}.{kind}"] = value
        else:
            unknown.append(key)
    for key in list(unknown):
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m is None:
            continue
        unknown.remove(key)
        n = int(m[1])
        if n >= keep:
            continue
        for name, part in zip(("q_proj", "k_proj", "v_proj"), src[key].chunk(3, dim=0), strict=True):
            out[f"{prefix}encoder.layers.{n}.self_attn.{name}.{m[2]}"] = part
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) are not OpenCLIP text-tower keys, e.g. {unknown[:5]}")

    vocab, width = src["token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=src["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=keep,
        num_attention_heads=width // head_width if width % head_width == 0 else 1,  # a tiny width: one head
        max_position_embeddings=src["positional_embedding"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=_projection_dim(state_dict, width),
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1 if vocab < 49408 else 1,
    )
    return out, config


def _projection_dim(state_dict: Mapping[str, torch.Tensor], default: int) -> int:
    """The text projection width of an OpenCLIP state dict (``default`` when it has none)."""
    for key, value in state_dict.items():
        if key.endswith("text_projection") and value.ndim == 2:
            return int(value.shape[1])
    return default


def transformers_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` weights (v4 or v5 keys) -> OpenCLIP text-tower keys (SD v2 ``cond_stage_model.model.*``
    without the ``cond_stage_model.`` prefix): q/k/v fused into ``attn.in_proj_*``; no ``text_projection``
    (a ``CLIPTextModel`` has none, and SD v2 conditions on hidden states, not on the projection).

    Raises:
        KeyError: for keys that are not CLIP text-model keys.
    """
    src = {_strip(k, "text_model."): v for k, v in state_dict.items() if _strip(k, "text_model.") not in _DROPPED_V1}
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer_names = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in src.items():
        if key in top:
            out["model." + top[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            unknown.append(key)
            continue
        n, name, kind = int(m[1]), m[2], m[3]
        if name in layer_names:
            out[f"model.transformer.resblocks.{n}.{layer_names[name]}.{kind}"] = value
        elif name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault((n, kind), {})[name[-6]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) are not CLIP text-model keys, e.g. {unknown[:5]}")
    for (n, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {n} lacks some of q/k/v_proj.{kind} (has {sorted(parts)})")
        out[f"model.transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _text_projection(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    found = [v for k, v in state_dict.items() if k.endswith("text_projection") and v.ndim == 2]
    if len(found) != 1:
        raise KeyError(f"expected one OpenCLIP 'text_projection' (width, projection) matrix, found {len(found)}")
    return found[0]


def openclip_to_transformers_with_projection(
    state_dict: Mapping[str, torch.Tensor], head_width: int = 64
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig]:
    """An OpenCLIP text tower with its ``text_projection`` (SDXL's ``conditioner.embedders.1.model.*``, the prefix up
    to ``model.`` removed) -> ``CLIPTextModelWithProjection`` weights and config.

    The projection, stored ``(width, projection)`` and applied as ``x @ text_projection``, becomes the bias-free
    Linear's ``text_projection.weight``, its transpose (as diffusers' ``convert_open_clip_checkpoint`` does).

    Raises:
        KeyError: for keys that are not OpenCLIP text-tower keys, or a missing ``text_projection``.
    """
    projection = _text_projection(state_dict)
    state, config = openclip_to_transformers(state_dict, head_width=head_width)
    prefix = projection_state_prefix()
    out = {prefix + _strip(k, "text_model."): v for k, v in state.items()}
    out["text_projection.weight"] = projection.T.contiguous()
    config.projection_dim = int(projection.shape[1])
    return out, config


def transformers_with_projection_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` weights -> OpenCLIP text-tower keys (``model.*``) with ``model.text_projection``
    as OpenCLIP stores it: ``(width, projection)``, the transpose of the Linear's weight.

    Raises:
        KeyError: for keys that are not CLIP text-model keys, or a missing ``text_projection.weight``.
    """
    if "text_projection.weight" not in state_dict:
        raise KeyError("'text_projection.weight' is missing: not a CLIPTextModelWithProjection state dict")
    out = transformers_to_openclip({k: v for k, v in state_dict.items() if k != "text_projection.weight"})
    out["model.text_projection"] = state_dict["text_projection.weight"].T.contiguous()
    return out


def clip_config_from_state(state_dict: Mapping[str, torch.Tensor], hidden_act: str = "quick_gelu", head_width: int = 64) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` inferred from ``CLIPTextModel`` weights (v4 or v5 keys).

    Shapes give the vocabulary, width, depth, MLP width and positions; they cannot give the head count
    (``width // head_width``, OpenAI's and OpenCLIP's 64-channel heads; one head when the width is not
    a multiple) or the activation (``quick_gelu`` for OpenAI CLIP, SD v1; ``gelu`` for OpenCLIP, SD v2).

    Raises:
        KeyError: if the token/position embeddings or layer weights are missing.
    """
    src = {_strip(k, "text_model."): v for k, v in state_dict.items()}
    for key in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight"):
        if key not in src:
            raise KeyError(f"CLIP text-model key {key!r} is missing ({len(src)} keys, e.g. {sorted(src)[:5]})")
    vocab, width = src["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(m[1]) for k in src if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(src["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=width // head_width if width % head_width == 0 else 1,
        max_position_embeddings=int(src["embeddings.position_embedding.weight"].shape[0]),
        hidden_act=hidden_act,
        bos_token_id=int(vocab) - 2,
        eos_token_id=int(vocab) - 1,
        pad_token_id=int(vocab) - 1,
    )
