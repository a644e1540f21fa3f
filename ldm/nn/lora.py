"""LoRA adapters for the UNet and the CLIP text encoder, built on ``peft``, saved in diffusers' format.

:func:`add_lora` injects peft ``LoraLayer``s in place of the matching ``nn.Linear`` (or conv) layers,
so the model keeps its class and ``forward`` signature; base weights are frozen and only the
``lora_A``/``lora_B`` parameters train. :func:`save_lora` writes one ``.safetensors`` file in the layout
diffusers' ``pipeline.load_lora_weights`` / ``UNet2DConditionModel.load_lora_adapter(prefix="unet")``
accept: ``unet.<diffusers module path>.lora_A.weight`` and
``text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_B.weight``, with the ``LoraConfig``
(``r``, ``lora_alpha``, ``target_modules``) under the ``lora_adapter_metadata`` header entry so the
scale ``alpha / rank`` is reproduced exactly by both loaders. :func:`load_lora` reads such a file back
onto a base UNet / text encoder / pipeline, mapping diffusers' module names back to ours.

Mixed precision: cast the model first, then call :func:`keep_lora_fp32` (peft casts the layer input to
the adapter's dtype and the sum back to the base layer's dtype).

Example:
    >>> add_lora(unet, rank=8, alpha=8)
    >>> ...  # train: only the lora parameters have requires_grad
    >>> save_lora("style.safetensors", unet=unet)
    >>> load_lora(pipeline, "style.safetensors", scale=0.7)  # or diffusers: pipe.load_lora_weights(...)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ldm.nn.attention import SpatialTransformer
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel
from ldm.nn.unet_blocks import ResBlock, UNetDownsample, UNetUpsample

ADAPTER = "default"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights(folder) reads
_PREFIXES = ("unet", "text_encoder")

# CompVis ResBlock layer -> diffusers ResnetBlock2D layer.
_RESNET_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


# ----------------------------------------------------------------------------------------------- inject


def add_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = UNET_TARGETS,
    dropout: float = 0.0,
) -> nn.Module:
    """Inject LoRA adapters into the layers of ``module`` named by ``target_modules``, in place.

    A layer matches when its full name equals a target or ends with ``"." + target`` (peft's rule), so
    the defaults hit every attention projection of a :class:`UNetModel`; use
    :data:`TEXT_ENCODER_TARGETS` for a :class:`TextEncoder` or ``CLIPTextModel``. Afterwards only the
    ``lora_`` parameters require grad. The adapter starts as a no-op (``lora_B`` is zero).

    Args:
        module: The model (its class and forward are unchanged).
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. ``None`` means ``rank`` (scale 1).
        target_modules: Layer names or name suffixes to adapt.
        dropout: Dropout on the LoRA branch input.

    Returns:
        ``module`` itself.

    Raises:
        ValueError: If ``module`` already has LoRA layers, ``rank`` is not positive, or no layer matches.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if lora_layers(module):
        raise ValueError("this module already has LoRA adapters; merge_lora() or load onto a fresh base model")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(target_modules),
        lora_dropout=dropout,
    )
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"no layer of {type(module).__name__} matches target_modules={list(target_modules)}: {err}") from err
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``module`` by name (empty when it has none)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def keep_lora_fp32(module: nn.Module) -> nn.Module:
    """Cast the LoRA parameters back to float32 (call after ``module.to(torch.bfloat16)``)."""
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, with our module names: ``<layer>.lora_A.weight`` / ``.lora_B.weight``."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}


def set_lora_scale(module: nn.Module, scale: float) -> None:
    """Scale every adapter's update to ``scale * alpha / rank`` (0 turns it off, 1 is as trained)."""
    for layer in lora_layers(module).values():
        layer.set_scale(ADAPTER, scale)


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold the adapters, at their current scale, into the base weights and remove the LoRA layers."""
    for name, layer in lora_layers(module).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return module


def _lora_hparams(module: nn.Module) -> tuple[int, float]:
    """(rank, alpha) of the adapters in ``module``; raises if they differ between layers."""
    pairs = {(layer.r[ADAPTER], float(layer.lora_alpha[ADAPTER])) for layer in lora_layers(module).values()}
    if len(pairs) != 1:
        raise ValueError(f"expected one (rank, alpha) for all LoRA layers, found {sorted(pairs) or 'no LoRA layers'}")
    return pairs.pop()


# ------------------------------------------------------------------------------------------ name maps


def unet_module_names_to_diffusers(unet: UNetModel) -> dict[str, str]:
    """Map every parameterised module of ``unet`` (CompVis names) to its diffusers ``UNet2DConditionModel`` name.

    Built from the UNet's own block structure, so it holds for any ``channel_mult``/``num_res_blocks``/
    ``attention_resolutions``. LoRA wrappers are looked through (their own name maps, their insides not).
    """
    nrb = unet.num_res_blocks
    prefixes: dict[str, tuple[str, str]] = {  # our block prefix -> (diffusers prefix, kind)
        "time_embed.0": ("time_embedding.linear_1", "plain"),
        "time_embed.2": ("time_embedding.linear_2", "plain"),
        "input_blocks.0.0": ("conv_in", "plain"),
        "out.0": ("conv_norm_out", "plain"),
        "out.2": ("conv_out", "plain"),
    }

    def add(ours: str, layer: nn.Module, resnet: str, attention: str, sampler: str) -> None:
        if isinstance(layer, ResBlock):
            prefixes[ours] = (resnet, "resnet")
        elif isinstance(layer, SpatialTransformer):
            prefixes[ours] = (attention, "plain")
        elif isinstance(layer, UNetDownsample):
            prefixes[ours + ".op"] = (sampler + ".conv", "plain")
        elif isinstance(layer, UNetUpsample):
            prefixes[ours + ".conv"] = (sampler + ".conv", "plain")

    for idx, block in enumerate(unet.input_blocks):
        if idx == 0:
            continue
        level, j = divmod(idx - 1, nrb + 1)
        for k, layer in enumerate(block):
            add(f"input_blocks.{idx}.{k}", layer, f"down_blocks.{level}.resnets.{j}",
                f"down_blocks.{level}.attentions.{j}", f"down_blocks.{level}.downsamplers.0")
    for k, layer in enumerate(unet.middle_block):
        add(f"middle_block.{k}", layer, f"mid_block.resnets.{k // 2}", "mid_block.attentions.0", "")
    for idx, block in enumerate(unet.output_blocks):
        level, j = divmod(idx, nrb + 1)
        for k, layer in enumerate(block):
            add(f"output_blocks.{idx}.{k}", layer, f"up_blocks.{level}.resnets.{j}",
                f"up_blocks.{level}.attentions.{j}", f"up_blocks.{level}.upsamplers.0")

    def convert(name: str) -> str | None:
        for ours, (theirs, kind) in prefixes.items():
            if name == ours or name.startswith(ours + "."):
                tail = name[len(ours) + 1 :]
                if kind == "resnet":
                    for src, dst in _RESNET_TO_DIFFUSERS.items():
                        if tail == src or tail.startswith(src + "."):
                            tail = dst + tail[len(src) :]
                            break
                    else:
                        return None
                return f"{theirs}.{tail}" if tail else theirs
        return None

    out: dict[str, str] = {}
    for name, module in unet.named_modules():
        if not name or ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        if isinstance(module, LoraLayer) or any(True for _ in module.parameters(recurse=False)):
            mapped = convert(name)
            if mapped is not None:
                out[name] = mapped
    return out


def _text_model_names_to_diffusers(module: nn.Module) -> dict[str, str]:
    """Map LoRA layer names of a TextEncoder / CLIPTextModel to diffusers' (``text_model.encoder...``)."""
    out = {}
    for name in lora_layers(module):
        inner = name.removeprefix("model.") if isinstance(module, TextEncoder) else name
        out[name] = inner if inner.startswith("text_model.") else f"text_model.{inner}"
    return out


def _names_to_diffusers(module: nn.Module) -> dict[str, str]:
    if isinstance(module, UNetModel):
        names = unet_module_names_to_diffusers(module)
        unmapped = [n for n in lora_layers(module) if n not in names]
        if unmapped:
            raise ValueError(f"LoRA layers with no diffusers name: {unmapped[:3]}")
        return {n: names[n] for n in lora_layers(module)}
    return _text_model_names_to_diffusers(module)


def _diffusers_to_names(module: nn.Module) -> dict[str, str]:
    """Inverse map, over all modules of a (possibly not yet adapted) model: diffusers name -> ours."""
    if isinstance(module, UNetModel):
        return {theirs: ours for ours, theirs in unet_module_names_to_diffusers(module).items()}
    out = {}
    wrapped = isinstance(module, TextEncoder)
    for name, _ in module.named_modules():
        if ".lora_" in name or ".base_layer" in name or (wrapped and not name.startswith("model.")):
            continue
        inner = name.removeprefix("model.") if wrapped else name
        if inner:
            out[inner if inner.startswith("text_model.") else f"text_model.{inner}"] = name
    return out


# ------------------------------------------------------------------------------------------- save/load


def save_lora(
    path: str | Path,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    alpha: float | None = None,
    rank: int | None = None,
) -> Path:
    """Write the adapters of ``unet`` and/or ``text_encoder`` to one diffusers-format ``.safetensors`` file.

    Keys are ``unet.<diffusers path>.lora_{A,B}.weight`` and
    ``text_encoder.text_model.<path>.lora_{A,B}.weight``; the header's ``lora_adapter_metadata`` holds
    each part's ``LoraConfig`` (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, ...), which
    diffusers uses to rebuild the adapter with the same ``alpha / rank`` scale.

    Args:
        path: Output file (parents are created).
        unet: A :class:`UNetModel` with LoRA layers.
        text_encoder: A :class:`TextEncoder` or ``CLIPTextModel`` with LoRA layers.
        alpha: Optional check: raise if the adapters were not built with this alpha.
        rank: Optional check: raise if the adapters were not built with this rank.

    Returns:
        The path written.
    """
    parts = {"unet": unet, "text_encoder": text_encoder}
    if all(m is None for m in parts.values()):
        raise ValueError("save_lora needs a unet and/or a text_encoder with LoRA adapters")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for prefix, module in parts.items():
        if module is None:
            continue
        if not lora_layers(module):
            raise ValueError(f"{prefix} has no LoRA adapters (call add_lora or load_lora first)")
        r, a = _lora_hparams(module)
        if rank is not None and rank != r:
            raise ValueError(f"{prefix} adapters have rank {r}, not the rank={rank} passed to save_lora")
        if alpha is not None and float(alpha) != a:
            raise ValueError(f"{prefix} adapters have alpha {a}, not the alpha={alpha} passed to save_lora")
        names = _names_to_diffusers(module)
        for key, value in lora_state_dict(module).items():
            layer, _, param = key.partition(".lora_")
            tensors[f"{prefix}.{names[layer]}.lora_{param}"] = value.to(torch.float32).contiguous().cpu()
        # Target names must match in the loader's model: for CLIP without the "text_model." level, which
        # transformers v5 flattened (peft also matches a target as a suffix after a ".").
        targets = sorted({n.removeprefix("text_model.") for n in names.values()})
        metadata |= {f"{prefix}.r": r, f"{prefix}.lora_alpha": a, f"{prefix}.target_modules": targets}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    save_file(tensors, str(path), metadata=header)
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and parsed ``lora_adapter_metadata`` (empty dict when absent) of a LoRA ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_LORA_FILE).is_file():
        path = path / DIFFUSERS_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist (give the .safetensors file or a folder holding {DIFFUSERS_LORA_FILE})")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    return tensors, meta


def _load_part(module: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, object], prefix: str, path: Path) -> None:
    inverse = _diffusers_to_names(module)
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        layer, sep, param = key.partition(".lora_")
        if not sep or param not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: key {prefix}.{key} is not a peft/diffusers LoRA weight (lora_A/lora_B)")
        if not isinstance(module, UNetModel):  # CLIP keys written without the "text_model." level
            if layer not in inverse and f"text_model.{layer}" in inverse:
                layer = f"text_model.{layer}"
        if layer not in inverse:
            raise ValueError(f"{path}: {prefix} layer {layer!r} does not exist in this {type(module).__name__}")
        state[f"{inverse[layer]}.lora_{param}"] = value
    if not lora_layers(module):
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
        rank = int(meta.get(f"{prefix}.r", 0)) or (ranks.pop() if len(ranks) == 1 else 0)
        if not rank:
            raise ValueError(f"{path}: {prefix} adapters have mixed ranks {sorted(ranks)} and no metadata; not supported")
        alpha = float(meta.get(f"{prefix}.lora_alpha", rank))
        targets = sorted({k.partition(".lora_")[0] for k in state})
        add_lora(module, rank=rank, alpha=alpha, target_modules=targets)
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if missing or unexpected:
        raise ValueError(f"{path}: {prefix} adapters do not match the model's LoRA layers "
                         f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    keep_lora_fp32(module)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


def load_lora(target: nn.Module | object, path: str | Path, scale: float = 1.0) -> None:
    """Load a diffusers-format LoRA file (as written by :func:`save_lora`) onto a model, in place.

    Args:
        target: A :class:`UNetModel` (reads the ``unet.`` keys), a :class:`TextEncoder` or
            ``CLIPTextModel`` (``text_encoder.`` keys), or a pipeline-like object with ``.unet`` and
            ``.text_encoder`` attributes (both). Models without adapters get them injected, with the
            file's rank and alpha (from its metadata; without metadata rank from the weights and alpha
            = rank); models that already have adapters get their weights replaced.
        path: The ``.safetensors`` file.
        scale: Multiplier of the adapters' ``alpha / rank`` (see :func:`set_lora_scale`).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not in the diffusers/peft layout or names layers the model lacks.
    """
    path = Path(path)
    tensors, meta = read_lora_file(path)
    unknown = sorted({k.split(".")[0] for k in tensors} - set(_PREFIXES))
    if unknown:
        raise ValueError(
            f"{path} has keys under {unknown}; expected the diffusers/peft LoRA layout with keys "
            "'unet.<module>.lora_A.weight' / 'text_encoder.<module>.lora_A.weight' (convert kohya-style files with diffusers first)"
        )
    if isinstance(target, UNetModel):
        parts = {"unet": target}
    elif isinstance(target, nn.Module) and not hasattr(target, "unet"):
        parts = {"text_encoder": target}
    else:
        parts = {p: getattr(target, p, None) for p in _PREFIXES}
    loaded = 0
    for prefix, module in parts.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not sub:
            continue
        if module is None:
            raise ValueError(f"{path} holds {prefix} adapters but the target has no {prefix}")
        _load_part(module, sub, meta, prefix, path)
        set_lora_scale(module, scale)
        loaded += 1
    if not loaded:
        raise ValueError(f"{path} holds no adapters for {sorted(parts)} (its parts: {sorted({k.split('.')[0] for k in tensors})})")
