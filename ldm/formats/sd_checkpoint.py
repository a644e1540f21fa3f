"""Original Stable Diffusion single-file checkpoints (``.safetensors`` / ``.ckpt``): read, detect, write.

Layout: ``model.diffusion_model.*`` (UNet, our ``UNetModel`` names), ``first_stage_model.*`` (VAE, our
``KLAutoencoder`` names), ``cond_stage_model.*`` (text encoder: ``transformer.text_model.*`` for SD v1,
OpenCLIP ``model.*`` for SD v2), and optionally the UNet's EMA under ``model_ema.*`` with the dots of
the parameter names removed (``model_ema.diffusion_modelinput_blocks00weight``). SDXL files keep their two text
encoders under ``conditioner.embedders.*`` instead (left in the split's ``other`` part for
:mod:`ldm.formats.sdxl_single_file`) and their UNet's vector conditioning under ``label_emb.*``.

Example:
    >>> parts = load_sd_checkpoint("v1-5-pruned.safetensors")
    >>> variant = detect_sd_variant(parts["unet"])
    >>> unet = UNetModel(**variant["unet_config"]); unet.load_state_dict(parts["unet"])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.formats.clip_keys import transformers_to_sd_v1_clip
from ldm.formats.weights import read_safetensors
from ldm.nn.unet import UNetModel

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"SD checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an unpickling error names the offending global
            raise ValueError(
                f"could not read {str(path)!r} safely (weights_only=True): {error}. "
                "Convert it to .safetensors with a tool you trust; ldm never unpickles arbitrary code."
            ) from error
        if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(data).__name__})")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"unknown checkpoint extension {path.suffix!r} of {str(path)!r}; expected .safetensors or .ckpt")


def _ema_key(unet_key: str) -> str:
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_sd_state_dict(state_dict: Mapping[str, torch.Tensor], use_ema: bool = True) -> dict[str, Any]:
    """Split a single-file SD state dict into UNet / VAE / text-encoder parts (prefixes removed).

    With ``use_ema`` and EMA weights present, UNet tensors are replaced by their ``model_ema.*``
    twins (those without a twin keep the plain weights, and are counted in the log).

    Returns:
        ``{"unet", "vae", "text_encoder", "other"}`` dicts and ``"ema_used"`` (number of UNet
        tensors taken from the EMA).
    """
    parts: dict[str, Any] = {"unet": {}, "vae": {}, "text_encoder": {}, "other": {}}
    ema: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(TEXT_PREFIX):
            parts["text_encoder"][key[len(TEXT_PREFIX) :]] = value
        elif key.startswith(EMA_PREFIX):
            if key not in _EMA_BOOKKEEPING:
                ema[key] = value
        else:
            parts["other"][key] = value
    parts["ema_used"] = 0
    if use_ema and ema:
        by_ema_key: dict[str, str] = {}
        for key in parts["unet"]:
            ema_key = _ema_key(key)
            if ema_key in by_ema_key:
                raise ValueError(f"EMA names of {by_ema_key[ema_key]!r} and {key!r} collide ({ema_key!r})")
            by_ema_key[ema_key] = key
        for ema_key, value in ema.items():
            key = by_ema_key.get(ema_key)
            if key is not None:
                parts["unet"][key] = value
                parts["ema_used"] += 1
        missing = len(parts["unet"]) - parts["ema_used"]
        unmatched = len(ema) - parts["ema_used"]
        if missing or unmatched:
            logger.warning(
                "EMA weights: %d UNet tensors have no EMA twin (kept the plain weights); %d EMA tensors matched no UNet key",
                missing,
                unmatched,
            )
    elif use_ema:
        logger.info("no EMA weights (model_ema.*) in the checkpoint; using the plain UNet weights")
    return parts


def load_sd_checkpoint(path: str | Path, use_ema: bool = True) -> dict[str, Any]:
    """Read an original SD single file and split it (see :func:`split_sd_state_dict`).

    ``.safetensors`` is read with safetensors; ``.ckpt`` with ``torch.load(weights_only=True)`` (its
    ``"state_dict"`` entry when there is one), so a checkpoint can never run code.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for an unknown extension or a file that cannot be read safely.
    """
    return split_sd_state_dict(_read_state_dict(Path(path)), use_ema=use_ema)


def _unet_part(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(UNET_PREFIX) for k in state_dict):
        return {k[len(UNET_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    return dict(state_dict)


def _layout_error(state_dict: Mapping[str, torch.Tensor], missing: list[str], unexpected: list[str], why: str) -> ValueError:
    return ValueError(
        f"unknown Stable Diffusion UNet layout ({why}): missing keys {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
        f"({len(state_dict)} keys in all). Expected an original SD checkpoint ('model.diffusion_model.*' "
        "with CompVis names); for a diffusers folder use read_diffusers_folder."
    )


def _block_count(unet: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``{prefix}N.`` transformer blocks among the keys (``prefix`` ends in ``transformer_blocks.``)."""
    return len({k[len(prefix):].split(".")[0] for k in unet if k.startswith(prefix)})


def detect_sd_variant(state_dict: Mapping[str, torch.Tensor], addition_time_embed_dim: int = 256) -> dict[str, Any]:
    """Infer SD version and our ``UNetModel`` config from tensor shapes.

    Args:
        state_dict: A whole single-file state dict (``model.diffusion_model.*`` keys) or the UNet part.
        addition_time_embed_dim: For a UNet with vector conditioning (SDXL's ``label_emb``): the width of each
            size/crop id's embedding inside it, which shapes alone cannot tell (SGM: 256).

    Returns:
        ``{"version": "v1" | "v2" | "xl", "inpainting": bool, "unet_config": {...}, "context_dim": int}``.
        Version: a UNet with vector conditioning (``label_emb``) -> xl; else cross-attention width 768 -> v1,
        1024 -> v2; other widths (custom models) -> v2 when the transformers use linear projections, else v1.
        Transformer depth: one count when every attention level and the middle block agree, else one per level
        (SDXL: ``(0, 2, 10)``) with the middle block's own count where it differs from the last level's.
        Heads follow the version's convention (v1: 8 heads; v2 and xl: 64-channel heads), which shapes cannot
        reveal; neither can the prediction type (SD 2.x 768-v models predict v) — the caller must know it.

    Raises:
        ValueError: for an unknown layout, listing some missing and unexpected keys.
    """
    unet = _unet_part(state_dict)
    required = ["time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight", "middle_block.1.proj_in.weight"]
    missing = [k for k in required if k not in unet]
    if missing:
        raise _layout_error(state_dict, missing, sorted(k for k in unet if k.split(".")[0] not in ("time_embed", "input_blocks", "middle_block", "output_blocks", "out")), "required keys missing")

    conv_in = unet["input_blocks.0.0.weight"]
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(unet["out.2.weight"].shape[0])
    linear = unet["middle_block.1.proj_in.weight"].ndim == 2
    to_k = [k for k in unet if k.startswith("middle_block.1.") and k.endswith("attn2.to_k.weight")]
    if not to_k:
        raise _layout_error(state_dict, ["middle_block.1.transformer_blocks.0.attn2.to_k.weight"], [], "no cross-attention")
    context_dim = int(unet[to_k[0]].shape[1])
    adm = unet.get("label_emb.0.0.weight")
    version = "xl" if adm is not None else {768: "v1", 1024: "v2"}.get(context_dim, "v2" if linear else "v1")
    middle = _block_count(unet, "middle_block.1.transformer_blocks.")

    # Walk input_blocks: level ends at a downsampler ("op").
    blocks = sorted({int(k.split(".")[1]) for k in unet if k.startswith("input_blocks.")})
    levels: list[list[int]] = [[]]
    for idx in blocks[1:]:
        if f"input_blocks.{idx}.0.op.weight" in unet:
            levels.append([])
        else:
            levels[-1].append(idx)
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels):
        raise _layout_error(state_dict, [], [f"input_blocks.{i}" for i in blocks], "irregular input blocks")
    channel_mult = []
    attention_resolutions = []
    depths = []  # transformer blocks per level (0: no attention)
    for level, indices in enumerate(levels):
        width_key = f"input_blocks.{indices[0]}.0.out_layers.3.weight"
        if width_key not in unet:
            raise _layout_error(state_dict, [width_key], [], "no ResBlock at the start of a level")
        channel_mult.append(int(unet[width_key].shape[0]) // model_channels)
        depths.append(0)
        if f"input_blocks.{indices[0]}.1.proj_in.weight" in unet:
            attention_resolutions.append(2**level)
            depths[-1] = _block_count(unet, f"input_blocks.{indices[0]}.1.transformer_blocks.")
    depth: int | tuple[int, ...] = middle
    depth_middle = None
    if {d for d in depths if d} - {middle}:
        depth, depth_middle = tuple(depths), None if middle == depths[-1] else middle
    unet_config: dict[str, Any] = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_resolutions),
        num_heads=8 if version == "v1" else -1,
        num_head_channels=-1 if version == "v1" else 64,
        context_dim=context_dim,
        transformer_depth=depth,
        use_linear_in_transformer=linear,
    )
    if depth_middle is not None:
        unet_config["transformer_depth_middle"] = depth_middle
    if adm is not None:
        unet_config.update(adm_in_channels=int(adm.shape[1]), addition_time_embed_dim=addition_time_embed_dim)
    # Head counts do not change shapes; build with 1 head so custom widths always construct.
    probe = dict(unet_config, num_heads=1, num_head_channels=-1)
    try:
        with torch.device("meta"):
            expected = UNetModel(**probe).state_dict()
    except ValueError as error:
        raise _layout_error(state_dict, [], [], f"inferred config {unet_config} does not build: {error}") from error
    missing = sorted(set(expected) - set(unet))
    unexpected = sorted(set(unet) - set(expected))
    wrong = [k for k in expected if k in unet and tuple(expected[k].shape) != tuple(unet[k].shape)]
    if missing or unexpected or wrong:
        raise _layout_error(state_dict, missing + wrong, unexpected, f"inferred config {unet_config} does not match")
    return {"version": version, "inpainting": in_channels == 9, "unet_config": unet_config, "context_dim": context_dim}


CONDITIONER_PREFIX = "conditioner.embedders."  # SDXL's text encoders (SGM's conditioner)


def is_sdxl_checkpoint(parts: dict[str, Any]) -> bool:
    """Whether a split single file (:func:`split_sd_state_dict`) is SDXL-shaped: it has ``conditioner.embedders.*``
    text encoders or a UNet with vector conditioning (``label_emb``)."""
    return "label_emb.0.0.weight" in parts["unet"] or any(k.startswith(CONDITIONER_PREFIX) for k in parts["other"])


def _contiguous_unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in tensors.items():
        value = value.detach().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:
            value = value.clone()
        seen.add(ident)
        out[key] = value.cpu()
    return out


def save_sd_checkpoint(
    path: str | Path,
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    clip_sd_v1_layout: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an original SD single file (``.safetensors``).

    Args:
        path: Output file; must end in ``.safetensors``.
        unet_sd: Our ``UNetModel`` state dict (written under ``model.diffusion_model.``).
        vae_sd: Our ``KLAutoencoder`` state dict (``first_stage_model.``).
        clip_sd_v1_layout: Text encoder, either already in an SD layout (v1 ``transformer.text_model.*``,
            v2 OpenCLIP ``model.*``) or a ``CLIPTextModel`` state dict (converted to the v1 layout);
            ``None`` writes no text encoder.
        metadata: Extra string metadata for the safetensors header.

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    out_path = Path(path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"SD checkpoints are written as .safetensors only, got {str(out_path)!r}")
    tensors: dict[str, torch.Tensor] = {UNET_PREFIX + k: v for k, v in unet_sd.items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae_sd.items()})
    if clip_sd_v1_layout is not None:
        clip = dict(clip_sd_v1_layout)
        if not (all(k.startswith("transformer.") for k in clip) or all(k.startswith("model.") for k in clip)):
            clip = transformers_to_sd_v1_clip(clip)
        tensors.update({TEXT_PREFIX + k: v for k, v in clip.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous_unshared(tensors), str(out_path), metadata={"format": "pt", **dict(metadata or {})})
    return out_path
