"""LoRA adapters for the UNet and the CLIP text encoder, built on ``peft``.

:func:`add_lora` injects peft ``LoraLayer``s in place of the matching ``nn.Linear`` (or conv) layers,
so the model keeps its class and ``forward`` signature; base weights are frozen and only the
``lora_A``/``lora_B`` parameters train. :func:`set_lora_scale` changes their strength and
:func:`merge_lora` folds them into the base weights. Adapter files (diffusers' layout) are read and
written by :mod:`ldm.formats.lora_files`.

Mixed precision: cast the model first, then call :func:`keep_lora_fp32` (peft casts the layer input to
the adapter's dtype and the sum back to the base layer's dtype).

Example:
    >>> add_lora(unet, rank=8, alpha=8)
    >>> ...  # train: only the lora parameters have requires_grad
    >>> set_lora_scale(unet, 0.7)
    >>> merge_lora(unet)  # a plain UNet again
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# ----------------------------------------------------------------------------------------------- inject


def add_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = UNET_TARGETS,
    dropout: float = 0.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
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
        rank_pattern: Per-layer ranks that differ from ``rank``, keyed like targets (peft's ``rank_pattern``).
        alpha_pattern: Per-layer alphas that differ from ``alpha``, likewise.

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
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern={k: float(v) for k, v in (alpha_pattern or {}).items()},
    )
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"no layer of {type(module).__name__} matches target_modules={list(target_modules)}: {err}") from err
    return _train_only_lora(module)


def _train_only_lora(module: nn.Module) -> nn.Module:
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def is_lora_internal(name: str) -> bool:
    """Whether a module name is inside a LoRA layer (its adapters or its wrapped base layer), not a model layer."""
    return ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``module`` by name (empty when it has none)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def keep_lora_fp32(module: nn.Module) -> nn.Module:
    """Cast the LoRA parameters back to float32 (call after ``module.to(torch.bfloat16)``)."""
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return module


def _lora_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter weight parameters of ``module``, keyed ``<layer>.lora_A.weight`` / ``.lora_B.weight``. Read from the
    LoRA layers themselves, so they are found whichever module :func:`add_lora` was given (a pipeline's text encoder
    wrapper, its ``CLIPTextModel``, or a module holding both of SDXL's encoders)."""
    return {f"{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")[ADAPTER].weight
            for name, layer in lora_layers(module).items() for ab in ("A", "B")}


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, with our module names: ``<layer>.lora_A.weight`` / ``.lora_B.weight``."""
    return {k: v.detach() for k, v in _lora_weights(module).items()}


def set_lora_scale(module: nn.Module, scale: float) -> None:
    """Scale every adapter's update to ``scale * alpha / rank`` (0 turns it off, 1 is as trained)."""
    for layer in lora_layers(module).values():
        layer.set_scale(ADAPTER, scale)


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold the adapters, at their current scale, into the base weights and remove the LoRA layers."""
    return remove_lora(module, merge=True)


def remove_lora(module: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back in place of the LoRA layers; ``merge`` folds the adapters in first, else they are
    dropped (the module computes what it did before :func:`add_lora`)."""
    for name, layer in lora_layers(module).items():
        if merge:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    for sub in module.modules():  # peft's record of the injection, on whichever module add_lora was given
        if "peft_config" in vars(sub):
            del sub.peft_config
    return module


class LoraSnapshot:
    """What a failed adapter load must restore on ``module``: whether it had adapters, their weights and scales,
    and which parameters required grad."""

    def __init__(self, module: nn.Module):
        self.module = module
        layers = lora_layers(module)
        self.state = {k: v.clone() for k, v in lora_state_dict(module).items()} if layers else None
        self.scaling = {name: dict(layer.scaling) for name, layer in layers.items()}
        self.requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}

    def restore(self) -> None:
        if self.state is None:
            remove_lora(self.module)
        else:
            set_lora_state_dict(self.module, self.state)
            for name, layer in lora_layers(self.module).items():
                layer.scaling.update(self.scaling.get(name, {}))
        for name, param in self.module.named_parameters():
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])


def lora_hparams(module: nn.Module) -> tuple[int, float]:
    """(rank, alpha) of the adapters in ``module``; raises if they differ between layers."""
    pairs = {(layer.r[ADAPTER], float(layer.lora_alpha[ADAPTER])) for layer in lora_layers(module).values()}
    if len(pairs) != 1:
        raise ValueError(f"expected one (rank, alpha) for all LoRA layers, found {sorted(pairs) or 'no LoRA layers'}")
    return pairs.pop()


def set_lora_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Replace the adapter weights of ``module`` (which has adapters) by ``state``, keyed like :func:`lora_state_dict`.

    The adapters end up in float32 and are the only parameters that require grad. Nothing is changed unless every
    tensor fits.

    Raises:
        ValueError: If ``state`` does not cover exactly the module's LoRA layers.
        RuntimeError: If a tensor's shape differs from its adapter's (another rank or layer width).
    """
    params = _lora_weights(module)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapters do not match the model's LoRA layers (missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    wrong = next((k for k, p in params.items() if tuple(state[k].shape) != tuple(p.shape)), None)
    if wrong is not None:
        raise RuntimeError(f"size mismatch for {wrong}: copying a param with shape {tuple(state[wrong].shape)}, the "
                           f"shape in the current model is {tuple(params[wrong].shape)}")
    for key, param in params.items():
        param.data = state[key].detach().to(device=param.device, dtype=torch.float32).clone()
    _train_only_lora(keep_lora_fp32(module))


def lora_layer_hparams(module: nn.Module) -> dict[str, tuple[int, float]]:
    """(rank, alpha) of every LoRA layer of ``module``, by layer name (they may differ between layers)."""
    return {name: (layer.r[ADAPTER], float(layer.lora_alpha[ADAPTER])) for name, layer in lora_layers(module).items()}


def most_common(values: Sequence[int] | Sequence[float]) -> int | float:
    """The value most layers share (the first one seen on a tie): a LoRA's headline rank or alpha."""
    return Counter(values).most_common(1)[0][0]


def put_lora_weights(module: nn.Module, state: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
                     alphas: Mapping[str, float]) -> None:
    """Give ``module`` the adapters of a LoRA file: ``state`` keyed like :func:`lora_state_dict`, with each layer's rank
    and alpha. A module without adapters gets them injected into exactly those layers (each with its own rank and
    alpha, as kohya's block dims and peft's ``rank_pattern`` allow); a module with adapters gets their weights replaced.

    Raises:
        ValueError: If the module's adapters differ from the file's in a layer's rank or alpha, or cover other layers.
    """
    if not lora_layers(module):
        rank, alpha = most_common(list(ranks.values())), most_common(list(alphas.values()))
        add_lora(module, rank=rank, alpha=alpha, target_modules=sorted(ranks),
                 rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},  # peft reads these as regexes
                 alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha})
    else:
        have = lora_layer_hparams(module)
        wrong = [n for n in ranks if n in have and have[n] != (ranks[n], float(alphas[n]))]
        if wrong:
            raise ValueError(f"layer {wrong[0]} has rank/alpha {ranks[wrong[0]]}/{alphas[wrong[0]]:g} in the file but "
                             f"{have[wrong[0]][0]}/{have[wrong[0]][1]:g} in the adapters already on the model; load onto a "
                             "model without adapters")
    set_lora_state_dict(module, state)
