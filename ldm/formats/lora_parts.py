"""Which models a LoRA file's parts belong to, and the module names both LoRA layouts use for the text encoders.

A LoRA file holds up to three parts: ``unet``, ``text_encoder`` and, for SDXL, ``text_encoder_2`` (diffusers' part
names; kohya's are ``lora_unet_``, ``lora_te_`` or ``lora_te1_``, and ``lora_te2_``). :func:`lora_targets` finds
them on what a loader is given (a UNet, a text encoder, SDXL's :class:`DualTextEncoder`, or a pipeline);
:func:`parts_to_save` checks what a writer is given. Text-encoder layers are named by their ``transformers`` module
path with the ``text_model.`` level (``text_model.encoder.layers.0.self_attn.q_proj``), as kohya and diffusers write
them whichever transformers version is installed; ``CLIPTextModelWithProjection.text_projection`` sits outside it.
"""

from __future__ import annotations

from torch import nn

from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.lora import is_lora_internal, lora_layers
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel

__all__ = ["PARTS", "TEXT_PARTS", "clip_path", "is_sdxl", "lora_targets", "parts_to_save", "text_encoder_paths"]

PARTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_PARTS = PARTS[1:]
_WRAPPER = "model."  # TextEncoder holds its CLIPTextModel as .model
_TEXT_LEVEL = "text_model."
_OUTSIDE_TEXT_LEVEL = "text_projection"


def lora_targets(target: nn.Module | object) -> dict[str, nn.Module | None]:
    """The models a LoRA file's parts go to, by part name.

    A :class:`UNetModel` is the ``unet`` part; a :class:`DualTextEncoder` is ``text_encoder`` (its first encoder) and
    ``text_encoder_2``; any other module is a ``text_encoder``; anything else is read as a pipeline with ``.unet`` and
    ``.text_encoder`` attributes (either may be None; a dual text encoder is split as above, a single one leaves
    ``text_encoder_2`` None, so that an SDXL file's second-encoder adapters are refused rather than skipped).
    """
    if isinstance(target, UNetModel):
        return {"unet": target}
    if isinstance(target, DualTextEncoder):
        return {"text_encoder": target.first, "text_encoder_2": target.second}
    if isinstance(target, nn.Module) and not hasattr(target, "unet"):
        return {"text_encoder": target}
    text = getattr(target, "text_encoder", None)
    texts = lora_targets(text) if isinstance(text, DualTextEncoder) else {"text_encoder": text, "text_encoder_2": None}
    return {"unet": getattr(target, "unet", None), **texts}


def parts_to_save(writer: str, unet: nn.Module | None, text_encoder: nn.Module | None,
                  text_encoder_2: nn.Module | None) -> dict[str, nn.Module]:
    """The parts a LoRA writer saves, each with adapters. ``text_encoder`` may be SDXL's :class:`DualTextEncoder`
    (then ``text_encoder_2`` must be None): those of its two encoders that have adapters are saved.

    Raises:
        ValueError: If nothing is given, or a part given (a dual encoder: both of its encoders) has no adapters.
    """
    if isinstance(text_encoder, DualTextEncoder):
        if text_encoder_2 is not None:
            raise ValueError(f"{writer}: text_encoder is SDXL's DualTextEncoder (both encoders); do not pass text_encoder_2 too")
        dual = {p: m for p, m in lora_targets(text_encoder).items() if lora_layers(m)}
        if not dual:
            raise ValueError(f"{writer}: neither SDXL text encoder has LoRA adapters (call add_lora or load_lora first)")
    else:
        dual = {p: m for p, m in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if m is not None}
    parts = {p: m for p, m in {"unet": unet, **dual}.items() if m is not None}
    if not parts:
        raise ValueError(f"{writer} needs a unet and/or text encoder(s) with LoRA adapters")
    for part, module in parts.items():
        if not lora_layers(module):
            raise ValueError(f"{writer}: {part} has no LoRA adapters (call add_lora or load_lora first)")
    return parts


def is_sdxl(parts: dict[str, nn.Module | None]) -> bool:
    """Whether the model of these parts is SDXL-shaped: two text encoders (a ``text_encoder_2``, or a
    :class:`DualTextEncoder` as ``text_encoder``), or a UNet with SDXL's size/crop vector conditioning
    (``addition_time_embed_dim``)."""
    unet = parts.get("unet")
    return (parts.get("text_encoder_2") is not None or isinstance(parts.get("text_encoder"), DualTextEncoder)
            or (isinstance(unet, UNetModel) and unet.config.addition_time_embed_dim is not None))


def clip_path(name: str) -> str:
    """A CLIP text model's module path (transformers v4 or v5, with or without ``text_model.``) as LoRA files write it."""
    if name.startswith(_TEXT_LEVEL) or name == _OUTSIDE_TEXT_LEVEL or name.startswith(_OUTSIDE_TEXT_LEVEL + "."):
        return name
    return _TEXT_LEVEL + name


def text_encoder_paths(module: nn.Module) -> dict[str, str]:
    """Our name of every module of a :class:`TextEncoder` or ``CLIPTextModel(WithProjection)`` -> its :func:`clip_path`
    (LoRA wrappers looked through, their insides left out)."""
    wrapped = isinstance(module, TextEncoder)
    names = (n for n, _ in module.named_modules() if n and not is_lora_internal(n))
    return {n: clip_path(n.removeprefix(_WRAPPER) if wrapped else n) for n in names if not wrapped or n.startswith(_WRAPPER)}
