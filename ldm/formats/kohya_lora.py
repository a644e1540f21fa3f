"""LoRA files in kohya's layout (sd-scripts; what A1111, Forge and ComfyUI load): read and write them.

A kohya file names each adapted layer by its module path with ``.`` replaced by ``_`` under a part prefix, and stores
three tensors per layer: ``<name>.lora_down.weight`` (peft's ``lora_A``), ``<name>.lora_up.weight`` (``lora_B``)
and ``<name>.alpha`` (a scalar; the update is scaled by ``alpha / rank``, rank = rows of ``lora_down``). For SD 1.x/2.x
the UNet part is ``lora_unet_`` + the diffusers module path (``lora_unet_down_blocks_0_attentions_0_transformer_
blocks_0_attn1_to_q``) and the text encoder part ``lora_te_`` + the CLIP path (``lora_te_text_model_encoder_layers_0_
self_attn_q_proj``); SDXL files use ``lora_te1_`` / ``lora_te2_`` for its two text encoders. Convolution layers
("LoCon", conv LoRA) keep 4-D ``lora_down`` ``[rank, in, kh, kw]`` and ``lora_up`` ``[out, rank, 1, 1]``, the shapes of
peft's conv adapters. Ranks and alphas may differ per layer (kohya's block dims); they are kept per layer.

Since module paths contain underscores themselves, names are never split: the kohya name of every module of the model
is computed and looked up instead.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.formats.clip_keys import transformers_to_diffusers_clip_name
from ldm.formats.unet_keys import ldm_to_diffusers_unet_names, unet_config_of
from ldm.nn.lora import ADAPTER, add_lora, is_lora_internal, lora_layers, lora_state_dict, set_lora_state_dict
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel

__all__ = ["KOHYA_PARTS", "is_kohya_lora", "kohya_parts_of", "load_kohya_part", "save_kohya_lora"]

KOHYA_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
"""Our part name -> kohya's key prefix (SD 1.x/2.x)."""
SDXL_TEXT_PREFIXES = ("lora_te1_", "lora_te2_")
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_WRAPPER = "model."  # TextEncoder holds its CLIPTextModel as .model


def is_kohya_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA file's keys are in kohya's layout."""
    return any(k.startswith(("lora_unet_", "lora_te")) for k in tensors)


def _kohya_names(module: nn.Module, prefix: str) -> dict[str, str]:
    """Our name of every (non-LoRA-internal) module of a UNet / TextEncoder / CLIPTextModel -> its kohya name."""
    names = [name for name, _ in module.named_modules() if name and not is_lora_internal(name)]
    if isinstance(module, UNetModel):
        paths = ldm_to_diffusers_unet_names(names, unet_config_of(module))
    else:
        wrapped = isinstance(module, TextEncoder)
        paths = {n: transformers_to_diffusers_clip_name(n.removeprefix(_WRAPPER) if wrapped else n)
                 for n in names if not wrapped or n.startswith(_WRAPPER)}
    return {ours: prefix + path.replace(".", "_") for ours, path in paths.items()}


def kohya_parts_of(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya file's tensors by our part name (``unet``, ``text_encoder``), keys kept whole.

    Raises:
        ValueError: For SDXL's two text-encoder parts or keys outside the layout.
    """
    if any(k.startswith(SDXL_TEXT_PREFIXES) for k in tensors):
        raise ValueError(f"{path} is an SDXL LoRA in kohya's layout (lora_te1_/lora_te2_ keys: two text encoders); "
                         "ldm loads SD 1.x/2.x-shaped models only so far, so it cannot be applied here")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part = next((p for p, prefix in KOHYA_PARTS.items() if key.startswith(prefix)), None)
        if part is None or not key.endswith(_SUFFIXES):
            raise ValueError(f"{path}: key {key!r} is not in kohya's LoRA layout "
                             "(lora_unet_*/lora_te_* with .lora_down.weight, .lora_up.weight, .alpha)")
        parts.setdefault(part, {})[key] = value
    return parts


def load_kohya_part(module: nn.Module, tensors: dict[str, torch.Tensor], part: str, path: Path) -> None:
    """Put one part's kohya adapters onto ``module`` (injecting them, with each layer's rank and alpha, when it has
    none; else replacing the weights of the adapters it has)."""
    by_kohya = {kohya: ours for ours, kohya in _kohya_names(module, KOHYA_PARTS[part]).items()}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next(s for s in _SUFFIXES if key.endswith(s))
        layers.setdefault(key[: -len(suffix)], {})[suffix] = value
    unknown = sorted(name for name in layers if name not in by_kohya)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} {part} layer(s) of the file do not exist in this "
                         f"{type(module).__name__}, e.g. {unknown[:3]} (a LoRA for another model?)")
    state, ranks, alphas = {}, {}, {}
    for name, parts in layers.items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise ValueError(f"{path}: layer {name} lacks its lora_down or lora_up weight")
        ours = by_kohya[name]
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        ranks[ours] = int(down.shape[0])
        alphas[ours] = float(parts[".alpha"].item()) if ".alpha" in parts else float(ranks[ours])
        state[f"{ours}.lora_A.weight"], state[f"{ours}.lora_B.weight"] = down, up
    if not lora_layers(module):
        rank = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        add_lora(module, rank=rank, alpha=alpha, target_modules=sorted(ranks),
                 rank_pattern={_exact(n): r for n, r in ranks.items() if r != rank},
                 alpha_pattern={_exact(n): a for n, a in alphas.items() if a != alpha})
    else:
        have = lora_layers(module)
        wrong = [n for n in ranks if n in have and (have[n].r[ADAPTER], float(have[n].lora_alpha[ADAPTER])) != (ranks[n], alphas[n])]
        if wrong:
            raise ValueError(f"{path}: {part} layer {wrong[0]} has rank/alpha {ranks[wrong[0]]}/{alphas[wrong[0]]} in the "
                             "file but not in the adapters already on the model; load onto a model without adapters")
    try:
        set_lora_state_dict(module, state)
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch's size mismatch
        raise ValueError(f"{path}: {part} {err}") from err


def _exact(name: str) -> str:
    """A peft rank/alpha pattern that matches the module ``name`` only (peft reads pattern keys as regexes)."""
    return re.escape(name)


def save_kohya_lora(path: str | Path, unet: nn.Module | None = None, text_encoder: nn.Module | None = None) -> Path:
    """Write the adapters of ``unet`` and/or ``text_encoder`` to one ``.safetensors`` file in kohya's layout.

    Args:
        path: Output file (parents are created).
        unet: A :class:`UNetModel` with LoRA layers.
        text_encoder: A :class:`TextEncoder` or ``CLIPTextModel`` with LoRA layers.

    Returns:
        The path written.
    """
    parts = {"unet": unet, "text_encoder": text_encoder}
    if all(m is None for m in parts.values()):
        raise ValueError("save_kohya_lora needs a unet and/or a text_encoder with LoRA adapters")
    tensors: dict[str, torch.Tensor] = {}
    dims, alphas = set(), set()
    for part, module in parts.items():
        if module is None:
            continue
        layers = lora_layers(module)
        if not layers:
            raise ValueError(f"{part} has no LoRA adapters (call add_lora or load_lora first)")
        names = _kohya_names(module, KOHYA_PARTS[part])
        state = lora_state_dict(module)
        for layer_name, layer in layers.items():
            kohya = names[layer_name]
            rank, alpha = layer.r[ADAPTER], float(layer.lora_alpha[ADAPTER])
            tensors[f"{kohya}.lora_down.weight"] = state[f"{layer_name}.lora_A.weight"].float().contiguous().cpu()
            tensors[f"{kohya}.lora_up.weight"] = state[f"{layer_name}.lora_B.weight"].float().contiguous().cpu()
            tensors[f"{kohya}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            dims.add(rank)
            alphas.add(alpha)
    # sd-scripts' own header fields (strings), which UIs show; one value when all layers agree.
    metadata = {"ss_network_module": "networks.lora",
                "ss_network_dim": str(dims.pop()) if len(dims) == 1 else "mixed",
                "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "mixed"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    return path
