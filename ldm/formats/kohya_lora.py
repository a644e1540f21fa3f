"""LoRA files in kohya's layout (sd-scripts; what A1111, Forge and ComfyUI load): read and write them.

A kohya file names each adapted layer by its module path with ``.`` replaced by ``_`` under a part prefix, and stores
three tensors per layer: ``<name>.lora_down.weight`` (peft's ``lora_A``), ``<name>.lora_up.weight`` (``lora_B``)
and ``<name>.alpha`` (a scalar; the update is scaled by ``alpha / rank``, rank = rows of ``lora_down``).

* SD 1.x/2.x (sd-scripts trains them on diffusers' UNet): ``lora_unet_`` + the diffusers module path
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) and ``lora_te_`` + the CLIP path
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
* SDXL (sd-scripts trains it on SGM's UNet): ``lora_unet_`` + the SGM/CompVis module path, which is our UNet's own
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_unet_middle_block_1_proj_in``,
  ``lora_unet_output_blocks_0_1_...``), and ``lora_te1_`` / ``lora_te2_`` + the CLIP paths of its two text
  encoders. SDXL files whose UNet names follow diffusers' paths instead (what diffusers' ``convert_state_dict_to_
  kohya`` writes) are read too.

Convolution layers ("LoCon", conv LoRA) keep 4-D ``lora_down`` ``[rank, in, kh, kw]`` and ``lora_up``
``[out, rank, 1, 1]``, the shapes of peft's conv adapters. Ranks and alphas may differ per layer (kohya's block dims);
they are kept per layer. Since module paths contain underscores themselves, names are never split: the kohya name of
every module of the model is computed and looked up instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.formats.lora_parts import is_sdxl, parts_to_save, text_encoder_paths
from ldm.formats.unet_keys import ldm_to_diffusers_unet_names, unet_config_of
from ldm.nn.lora import is_lora_internal, lora_layer_hparams, lora_state_dict, put_lora_weights
from ldm.nn.unet import UNetModel

__all__ = ["KOHYA_PARTS", "SDXL_KOHYA_PARTS", "is_kohya_lora", "kohya_parts_of", "load_kohya_part", "save_kohya_lora"]

KOHYA_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
"""Our part name -> kohya's key prefix (SD 1.x/2.x)."""
SDXL_KOHYA_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
"""Our part name -> kohya's key prefix (SDXL)."""
SDXL_TEXT_PREFIXES = ("lora_te1_", "lora_te2_")
_PART_OF_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # sd-scripts' ss_base_model_version of SDXL LoRAs


def is_kohya_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA file's keys are in kohya's layout."""
    return any(k.startswith(("lora_unet_", "lora_te")) for k in tensors)


def _is_sgm_unet(module: nn.Module) -> bool:
    """Whether kohya names this UNet's layers by their SGM paths (SDXL) rather than diffusers' (SD 1.x/2.x)."""
    return isinstance(module, UNetModel) and is_sdxl({"unet": module})


def _module_paths(module: nn.Module, sgm: bool) -> dict[str, str]:
    """Our name of every (non-LoRA-internal) module of a UNet / text encoder -> its path in kohya's names: a UNet's
    own (SGM) path or its diffusers path; a text encoder's transformers path."""
    if not isinstance(module, UNetModel):
        return text_encoder_paths(module)
    names = [name for name, _ in module.named_modules() if name and not is_lora_internal(name)]
    return {n: n for n in names} if sgm else ldm_to_diffusers_unet_names(names, unet_config_of(module))


def _kohya_names(module: nn.Module, prefix: str) -> dict[str, str]:
    """Our module names -> the kohya names a writer uses (SGM paths for an SDXL UNet, diffusers' for SD 1.x/2.x)."""
    return {ours: prefix + path.replace(".", "_") for ours, path in _module_paths(module, _is_sgm_unet(module)).items()}


def _kohya_lookup(module: nn.Module, part: str) -> dict[str, str]:
    """Kohya name -> our module name, for every name a file may use for ``part`` of ``module``: an SDXL UNet's
    layers under their SGM and their diffusers paths; a text encoder's with and without ``text_model_`` (diffusers'
    converter writes the latter from a transformers v5 ``CLIPTextModel``), under ``lora_te_`` and ``lora_te1_``
    (which prefix fits the model was checked by :func:`kohya_parts_of`)."""
    prefixes = [p for p, q in _PART_OF_PREFIX.items() if q == part]
    schemes = (True, False) if _is_sgm_unet(module) else (False,)
    paths = [(ours, path) for sgm in schemes for ours, path in _module_paths(module, sgm).items()]
    if not isinstance(module, UNetModel):
        paths += [(ours, path.removeprefix("text_model.")) for ours, path in paths if path.startswith("text_model.")]
    return {prefix + path.replace(".", "_"): ours for prefix in prefixes for ours, path in paths}


def kohya_parts_of(tensors: dict[str, torch.Tensor], path: Path, sdxl: bool) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya file's tensors by our part name (``unet``, ``text_encoder``, ``text_encoder_2``), keys kept whole.

    Args:
        tensors: The file's tensors.
        path: The file (named in errors).
        sdxl: Whether the model is SDXL-shaped (two text encoders: ``lora_te1_``/``lora_te2_``), else SD 1.x/2.x
            (one: ``lora_te_``).

    Raises:
        ValueError: For keys outside the layout, or text-encoder keys for the other kind of model.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, value in tensors.items():
        prefix = next((p for p in _PART_OF_PREFIX if key.startswith(p)), None)
        if prefix is None or not key.endswith(_SUFFIXES):
            raise ValueError(f"{path}: key {key!r} is not in kohya's LoRA layout (lora_unet_*/lora_te_*/lora_te1_*/"
                             "lora_te2_* with .lora_down.weight, .lora_up.weight, .alpha)")
        prefixes.add(prefix)
        parts.setdefault(_PART_OF_PREFIX[prefix], {})[key] = value
    one, two = "lora_te_" in prefixes, bool(prefixes & set(SDXL_TEXT_PREFIXES))
    if one and two:
        raise ValueError(f"{path} mixes SD 1.x/2.x (lora_te_) and SDXL (lora_te1_/lora_te2_) text-encoder keys")
    if sdxl and one:
        raise ValueError(f"{path} is an SD 1.x/2.x LoRA in kohya's layout (lora_te_ keys: one text encoder) but this "
                         "model is SDXL (two text encoders, lora_te1_/lora_te2_); use a LoRA trained for SDXL")
    if not sdxl and two:
        raise ValueError(f"{path} is an SDXL LoRA in kohya's layout (lora_te1_/lora_te2_ keys: two text encoders) but "
                         "this model is SD 1.x/2.x-shaped (one text encoder); load it onto an SDXL pipeline")
    return parts


def load_kohya_part(module: nn.Module, tensors: dict[str, torch.Tensor], part: str, path: Path) -> None:
    """Put one part's kohya adapters onto ``module`` (injecting them, with each layer's rank and alpha, when it has
    none; else replacing the weights of the adapters it has).

    Raises:
        ValueError: For layers the module lacks, a layer without its down or up weight, or shapes, ranks or alphas
            that do not fit; the message names ``path``.
    """
    by_kohya = _kohya_lookup(module, part)
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
        if ours in ranks:
            raise ValueError(f"{path}: {part} layer {ours} appears twice in the file (under two of its names)")
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        ranks[ours] = int(down.shape[0])
        alphas[ours] = float(parts[".alpha"].item()) if ".alpha" in parts else float(ranks[ours])
        state[f"{ours}.lora_A.weight"], state[f"{ours}.lora_B.weight"] = down, up
    try:
        put_lora_weights(module, state, ranks, alphas)
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch's size mismatch
        raise ValueError(f"{path}: {part} {err}") from err


def save_kohya_lora(path: str | Path, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
                    text_encoder_2: nn.Module | None = None) -> Path:
    """Write the adapters of ``unet`` and/or the text encoder(s) to one ``.safetensors`` file in kohya's layout.

    An SDXL model (a UNet with SDXL's vector conditioning, or two text encoders) is written as SDXL files are:
    SGM UNet names and ``lora_te1_`` / ``lora_te2_``; others as SD 1.x/2.x files (diffusers UNet names, ``lora_te_``).

    Args:
        path: Output file (parents are created).
        unet: A :class:`UNetModel` with LoRA layers.
        text_encoder: A :class:`TextEncoder` or ``CLIPTextModel`` with LoRA layers, or SDXL's
            :class:`DualTextEncoder` (those of its encoders that have adapters are written).
        text_encoder_2: SDXL's second text encoder, when ``text_encoder`` is its first alone.

    Returns:
        The path written.

    Raises:
        ValueError: If nothing with adapters is given.
    """
    parts = parts_to_save("save_kohya_lora", unet, text_encoder, text_encoder_2)
    sdxl = is_sdxl({"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    prefixes = SDXL_KOHYA_PARTS if sdxl else KOHYA_PARTS
    tensors: dict[str, torch.Tensor] = {}
    dims, alphas = set(), set()
    for part, module in parts.items():
        names = _kohya_names(module, prefixes[part])
        state = lora_state_dict(module)
        for layer_name, (rank, alpha) in lora_layer_hparams(module).items():
            kohya = names[layer_name]
            tensors[f"{kohya}.lora_down.weight"] = state[f"{layer_name}.lora_A.weight"].float().contiguous().cpu()
            tensors[f"{kohya}.lora_up.weight"] = state[f"{layer_name}.lora_B.weight"].float().contiguous().cpu()
            tensors[f"{kohya}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            dims.add(rank)
            alphas.add(alpha)
    # sd-scripts' own header fields (strings), which UIs show; one value when all layers agree.
    metadata = {"ss_network_module": "networks.lora",
                "ss_network_dim": str(dims.pop()) if len(dims) == 1 else "mixed",
                "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "mixed"}
    if sdxl:
        metadata["ss_base_model_version"] = SDXL_BASE_MODEL_VERSION
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    return path
