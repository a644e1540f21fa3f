"""LoRA adapter files in diffusers' layout: write the adapters of a UNet / text encoder(s), read them back.

:func:`save_lora` writes one ``.safetensors`` file in the layout diffusers' ``pipeline.load_lora_weights`` /
``UNet2DConditionModel.load_lora_adapter(prefix="unet")`` accept: ``unet.<diffusers module path>.lora_A.weight``
and ``text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_B.weight`` (SDXL: also ``text_encoder_2.*`` for
its second text encoder), with each part's ``LoraConfig`` (``r``, ``lora_alpha``, ``target_modules``, and
``rank_pattern`` / ``alpha_pattern`` for layers that differ) under the ``lora_adapter_metadata`` header entry so the
scale ``alpha / rank`` is reproduced exactly by both loaders. :func:`load_lora` reads such a file, or one in kohya's
layout (:mod:`ldm.formats.kohya_lora`), back onto a base UNet / text encoder / pipeline. Module names are translated
with the UNet key map of :mod:`ldm.formats.unet_keys` and the CLIP paths of :mod:`ldm.formats.lora_parts`; the
adapters themselves (peft) are :mod:`ldm.nn.lora`'s.

Example:
    >>> add_lora(unet, rank=8, alpha=8)  # ldm.nn.lora
    >>> ...  # train: only the lora parameters have requires_grad
    >>> save_lora("style.safetensors", unet=unet)
    >>> load_lora(pipeline, "style.safetensors", scale=0.7)  # or diffusers: pipe.load_lora_weights(...)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.formats.config_files import parse_json_config
from ldm.formats.kohya_lora import is_kohya_lora, kohya_parts_of, load_kohya_part
from ldm.formats.lora_parts import PARTS, clip_path, is_sdxl, lora_targets, parts_to_save, text_encoder_paths
from ldm.formats.unet_keys import diffusers_to_ldm_unet_names, ldm_to_diffusers_unet_names, unet_config_of
from ldm.formats.weights import open_safetensors
from ldm.nn.configs import Config, ConfigError, positive
from ldm.nn.lora import LoraSnapshot, is_lora_internal, lora_layer_hparams, lora_layers, lora_state_dict, most_common, put_lora_weights, set_lora_scale
from ldm.nn.unet import UNetModel

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights(folder) reads


# ------------------------------------------------------------------------------------------ name maps


def unet_module_names_to_diffusers(unet: UNetModel) -> dict[str, str]:
    """Map the modules of ``unet`` (CompVis names) to their diffusers ``UNet2DConditionModel`` names.

    Built from the UNet's block layout (:func:`ldm.formats.unet_keys.ldm_to_diffusers_unet_names`), so it
    holds for any ``channel_mult``/``num_res_blocks``/``attention_resolutions``. LoRA wrappers are looked
    through (their own name maps, their insides not); modules with no diffusers twin are left out.
    """
    names = (name for name, _ in unet.named_modules() if name and not is_lora_internal(name))
    return ldm_to_diffusers_unet_names(names, unet_config_of(unet))


def _to_diffusers_names(module: nn.Module) -> dict[str, str]:
    """The diffusers name of every LoRA layer of a UNet, TextEncoder or CLIPTextModel(WithProjection)."""
    layers = list(lora_layers(module))
    if isinstance(module, UNetModel):
        names = ldm_to_diffusers_unet_names(layers, unet_config_of(module))
        unmapped = [n for n in layers if n not in names]
        if unmapped:
            raise ValueError(f"LoRA layers with no diffusers name: {unmapped[:3]}")
        return names
    paths = text_encoder_paths(module)
    return {n: paths[n] for n in layers}


def _from_diffusers_names(module: nn.Module, names: set[str]) -> dict[str, str]:
    """Our module name of each diffusers layer name that exists in ``module`` (the others are left out). Text-encoder
    names may come with or without ``text_model.`` (transformers v4 or v5 wrote the file)."""
    if isinstance(module, UNetModel):
        ours = diffusers_to_ldm_unet_names(names, unet_config_of(module))
        existing = {name for name, _ in module.named_modules() if name and not is_lora_internal(name)}
        return {theirs: mine for theirs, mine in ours.items() if mine in existing}
    by_path = {path: mine for mine, path in text_encoder_paths(module).items()}
    return {theirs: by_path[clip_path(theirs)] for theirs in names if clip_path(theirs) in by_path}


def _peft_target(name: str) -> str:
    """A layer's name as a peft target / pattern key in a diffusers model: CLIP paths without the ``text_model.``
    level, which transformers v5 flattened in ``CLIPTextModel`` (peft matches a target as a suffix after a ``.``)."""
    return name.removeprefix("text_model.")


def _pattern_value(patterns: dict[str, object], name: str) -> object | None:
    """The value of the first peft ``rank_pattern``/``alpha_pattern`` key that matches layer ``name`` (peft's rule:
    the key, read as a regex, matches the whole name or a ``.``-separated tail of it), else None."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


# ------------------------------------------------------------------------------------------- save/load


def save_lora(
    path: str | Path,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    alpha: float | None = None,
    rank: int | None = None,
    *,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write the adapters of ``unet`` and/or the text encoder(s) to one diffusers-format ``.safetensors`` file.

    Keys are ``unet.<diffusers path>.lora_{A,B}.weight``, ``text_encoder.text_model.<path>.lora_{A,B}.weight`` and,
    for SDXL's second text encoder, ``text_encoder_2.text_model.<path>...``; the header's ``lora_adapter_metadata``
    holds each part's ``LoraConfig`` (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, and
    ``unet.rank_pattern`` / ``unet.alpha_pattern`` for layers whose rank or alpha differ from the most common one),
    which diffusers uses to rebuild the adapters with the same ``alpha / rank`` scales.

    Args:
        path: Output file (parents are created).
        unet: A :class:`UNetModel` with LoRA layers.
        text_encoder: A :class:`TextEncoder` or ``CLIPTextModel`` with LoRA layers, or SDXL's
            :class:`DualTextEncoder` (those of its two encoders that have adapters are written).
        alpha: Optional check: raise unless every adapter was built with this alpha.
        rank: Optional check: raise unless every adapter was built with this rank.
        text_encoder_2: SDXL's second text encoder, when ``text_encoder`` is its first alone.

    Returns:
        The path written.

    Raises:
        ValueError: If nothing with adapters is given, or the adapters fail the ``rank``/``alpha`` check.
    """
    parts = parts_to_save("save_lora", unet, text_encoder, text_encoder_2)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for prefix, module in parts.items():
        hparams = lora_layer_hparams(module)
        for r, a in hparams.values():
            if rank is not None and rank != r:
                raise ValueError(f"{prefix} adapters have rank {r}, not the rank={rank} passed to save_lora")
            if alpha is not None and float(alpha) != a:
                raise ValueError(f"{prefix} adapters have alpha {a:g}, not the alpha={alpha} passed to save_lora")
        names = _to_diffusers_names(module)
        for key, value in lora_state_dict(module).items():
            layer, _, param = key.partition(".lora_")
            tensors[f"{prefix}.{names[layer]}.lora_{param}"] = value.to(torch.float32).contiguous().cpu()
        r = most_common([r for r, _ in hparams.values()])
        a = most_common([a for _, a in hparams.values()])
        metadata |= {
            f"{prefix}.r": r,
            f"{prefix}.lora_alpha": a,
            f"{prefix}.target_modules": sorted({_peft_target(n) for n in names.values()}),
            f"{prefix}.rank_pattern": {_peft_target(names[n]): rn for n, (rn, _) in sorted(hparams.items()) if rn != r},
            f"{prefix}.alpha_pattern": {_peft_target(names[n]): an for n, (_, an) in sorted(hparams.items()) if an != a},
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    save_file(tensors, str(path), metadata=header)
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and parsed ``lora_adapter_metadata`` (empty dict when absent) of a LoRA ``.safetensors`` file (or of
    the folder's :data:`DIFFUSERS_LORA_FILE`, else of its only ``.safetensors`` file)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / DIFFUSERS_LORA_FILE] if (path / DIFFUSERS_LORA_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) > 1:
            raise ValueError(f"{path} holds several .safetensors files and no {DIFFUSERS_LORA_FILE}: give the file itself")
        path = candidates[0] if candidates else path
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist (give the .safetensors file, or a folder holding "
                                f"{DIFFUSERS_LORA_FILE} or a single .safetensors file)")
    with open_safetensors(path) as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = parse_json_config(header[METADATA_KEY], f"{path} (safetensors header {METADATA_KEY})") if METADATA_KEY in header else {}
    return tensors, meta


@dataclass(frozen=True)
class LoraPartMetadata(Config):
    """The adapter settings of one part (``unet``, ``text_encoder``) in a LoRA file's ``lora_adapter_metadata`` (peft's
    ``LoraConfig`` names; others are ignored).

    Args:
        r: Rank; None: from the weights.
        lora_alpha: Alpha; None: the rank.
    """

    r: int | None = None
    lora_alpha: float | None = None

    _RULES = {"r": positive, "lora_alpha": positive}


def _part_metadata(meta: dict[str, object], prefix: str, path: Path) -> LoraPartMetadata:
    values = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
    try:
        return LoraPartMetadata.from_dict(values)
    except ConfigError as error:
        raise error.located(f"{path} (safetensors header {METADATA_KEY})", prefix=prefix) from None


def _part_pattern(meta: dict[str, object], key: str, path: Path) -> dict[str, float]:
    """A part's ``rank_pattern`` or ``alpha_pattern`` from the metadata (empty when absent), checked."""
    pattern = meta.get(key) or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                                for v in pattern.values()):
        raise ValueError(f"{path} (safetensors header {METADATA_KEY}): {key} must map layer names to positive numbers, "
                         f"got {pattern!r}")
    return pattern


def _load_part(module: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, object], prefix: str, path: Path) -> None:
    split = {key: key.partition(".lora_") for key in tensors}
    for key, (layer, sep, param) in split.items():
        if not sep or param not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: key {prefix}.{key} is not a peft/diffusers LoRA weight (lora_A/lora_B)")
    ours = _from_diffusers_names(module, {layer for layer, _, _ in split.values()})
    state: dict[str, torch.Tensor] = {}
    for key, (layer, _, param) in split.items():
        if layer not in ours:
            raise ValueError(f"{path}: {prefix} layer {layer!r} does not exist in this {type(module).__name__}")
        state[f"{ours[layer]}.lora_{param}"] = tensors[key]
    # Each layer's rank is its lora_A's rows; its alpha the metadata's (alpha_pattern, else lora_alpha) or, without
    # metadata, its rank (scale 1, W + BA: what diffusers assumes then).
    ranks = {ours[layer]: int(tensors[key].shape[0]) for key, (layer, _, param) in split.items() if param == "A.weight"}
    missing = sorted(set(ours.values()) - set(ranks))
    if missing:
        raise ValueError(f"{path}: {prefix} layer {missing[0]} has a lora_B but no lora_A weight")
    settings = _part_metadata(meta, prefix, path)
    alpha_pattern = _part_pattern(meta, f"{prefix}.alpha_pattern", path)
    alphas = {}
    for layer, mine in ours.items():
        if mine in ranks:
            alpha = _pattern_value(alpha_pattern, _peft_target(layer)) or settings.lora_alpha or ranks[mine]
            alphas[mine] = float(alpha)
    _part_pattern(meta, f"{prefix}.rank_pattern", path)  # checked only: the weights' shapes give the ranks
    try:
        put_lora_weights(module, state, ranks, alphas)
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch's size mismatch (another rank or layer shape)
        raise ValueError(f"{path}: {prefix} {err}") from err


def load_lora(target: nn.Module | object, path: str | Path, scale: float = 1.0) -> None:
    """Load a LoRA file onto a model, in place: diffusers' layout (as :func:`save_lora` writes) or kohya's
    (:mod:`ldm.formats.kohya_lora`; per-layer ranks and alphas, conv layers), told apart by the keys. SD 1.x/2.x and
    SDXL files are both read; a file for the other kind of model is refused.

    Args:
        target: A :class:`UNetModel` (reads the ``unet.`` keys), a :class:`TextEncoder` or ``CLIPTextModel``
            (``text_encoder.`` keys), SDXL's :class:`DualTextEncoder` (``text_encoder.`` and ``text_encoder_2.``), or a
            pipeline-like object with ``.unet`` and ``.text_encoder`` attributes (all of its parts). Models without
            adapters get them injected, each layer with the file's rank and alpha (diffusers' layout: alpha from its
            metadata, else the layer's rank); models that already have adapters get their weights replaced.
        path: The ``.safetensors`` file, or a folder holding :data:`DIFFUSERS_LORA_FILE`.
        scale: Multiplier of the adapters' ``alpha / rank`` (see :func:`ldm.nn.lora.set_lora_scale`).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is in neither layout, is for another kind of model, or names layers the model lacks
            or shapes that do not fit; the model is then left as it was.
    """
    path = Path(path)
    tensors, meta = read_lora_file(path)
    parts = lora_targets(target)
    kohya = is_kohya_lora(tensors)
    if kohya:
        by_part = kohya_parts_of(tensors, path, sdxl=is_sdxl(parts))
    else:
        unknown = sorted({k.split(".")[0] for k in tensors} - set(PARTS))
        if unknown:
            raise ValueError(
                f"{path} has keys under {unknown}; expected the diffusers/peft LoRA layout ('unet.<module>.lora_A.weight', "
                "'text_encoder.<module>.lora_A.weight', 'text_encoder_2.<module>...') or kohya's "
                "('lora_unet_<module>.lora_down.weight', 'lora_te_...', 'lora_te1_...', 'lora_te2_...')"
            )
        by_part = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in PARTS}
    loaded = 0
    # All or nothing: a part that fails puts back every part touched so far (adapters removed or restored).
    snapshots = [LoraSnapshot(module) for module in parts.values() if module is not None]
    try:
        for prefix, module in parts.items():
            sub = by_part.get(prefix)
            if not sub:
                continue
            if module is None:
                raise ValueError(f"{path} holds {prefix} adapters but the target has no {prefix}"
                                 + (" (an SDXL LoRA: its second text encoder)" if prefix == "text_encoder_2" else ""))
            if kohya:
                load_kohya_part(module, sub, prefix, path)
            else:
                _load_part(module, sub, meta, prefix, path)
            set_lora_scale(module, scale)
            loaded += 1
    except Exception:
        for snapshot in snapshots:
            snapshot.restore()
        raise
    if not loaded:
        raise ValueError(f"{path} holds no adapters for {sorted(parts)} (its parts: {sorted({k.split('.')[0] for k in tensors})})")
