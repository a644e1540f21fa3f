"""Memory instruments of benchmarks/sd15_finetune_memory.py, usable on fake (meta-backed) tensors.

``PeakTracker`` (torch's MemTracker keeping only the global peak), ``SavedTensorCounter`` (bytes autograd saves
for backward, once per storage, per checkpointable block), ``ParamCasts`` (autocast's bf16 copies of trainable
parameters), ``cuda_autocast_rules`` / ``autocast_bf16`` (CUDA bf16 autocast emulated under CPU autocast, or set
by hand for fake CUDA tensors), and the storage helpers ``storage_key`` / ``storage_nbytes``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from ldm.nn.attention import BasicTransformerBlock
from ldm.nn.unet_blocks import ResBlock

BLOCKS = (ResBlock, BasicTransformerBlock)  # what set_gradient_checkpointing(True) checkpoints


class PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: its per-module peak bookkeeping walks every module on every
    op (O(modules x ops), minutes for this UNet); the module-wise breakdown is not used here."""

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ANN001 - signature of the private base method
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


class _NoHook:
    def remove(self) -> None:
        pass


NO_HOOK = _NoHook()


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it; fake tensors have real StorageImpls too)."""
    return t.untyped_storage()._cdata


def storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@contextlib.contextmanager
def cuda_autocast_rules(cuda: bool = False) -> Iterator[None]:
    """Under CPU autocast, apply CUDA autocast's choices for this UNet: GroupNorm/LayerNorm in fp32, SDPA
    through the fused flash kernel (what an H100/A100 runs for bf16 and head widths 40/80/160).

    With ``cuda=True`` (fake CUDA tensors under real CUDA autocast) only SDPA is routed: CUDA autocast
    already does the rest, and without a GPU the dispatcher would pick the math kernel. The functions
    are swapped in ``torch.nn.functional`` for the duration (restored on exit) rather than with a
    ``TorchFunctionMode``, because checkpoint recomputation inside ``backward()`` must see them too and
    a mode is switched off while it handles the ``backward`` call itself.
    """
    device = "cuda" if cuda else "cpu"
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "scaled_dot_product_attention")}

    def fp32(name: str):
        def wrapped(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                up = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
                args, kwargs = tree_map_only(torch.Tensor, up, args), tree_map_only(torch.Tensor, up, kwargs)
            return originals[name](*args, **kwargs)
        return wrapped

    def sdpa(q, k, v, *args, **kwargs):
        if args or kwargs:  # masks, dropout, causal: not used by the UNet
            return originals["scaled_dot_product_attention"](q, k, v, *args, **kwargs)
        if torch.is_autocast_enabled(device):
            q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
        if cuda:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]

    patched = {"scaled_dot_product_attention": sdpa}
    if not cuda:
        patched |= {"group_norm": fp32("group_norm"), "layer_norm": fp32("layer_norm")}
    try:
        for name, fn in patched.items():
            setattr(F, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@contextlib.contextmanager
def autocast_bf16(device: str, enabled: bool = True) -> Iterator[None]:
    """``torch.autocast(device, bf16)``; for "cuda" without a GPU, the same thread-local state set by hand
    (``torch.autocast('cuda')`` refuses when CUDA is unavailable)."""
    if not enabled:
        yield
        return
    if device == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
        return
    prev = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device, prev[0])
        torch.set_autocast_dtype(device, prev[1])


class ParamCasts(TorchDispatchMode):
    """Records the storages of the bf16 copies autocast makes of trainable fp32 parameters: the ones its cast
    cache keeps alive until the autocast region ends (leaf, requires grad, cast to the lower precision)."""

    def __init__(self, param_keys: set[int]):
        super().__init__()
        self.param_keys, self.casts = param_keys, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0]
        if (func is torch.ops.aten._to_copy.default and src.requires_grad and src.dtype == torch.float32
                and out.dtype == torch.bfloat16 and storage_key(src) in self.param_keys):
            self.casts[storage_key(out)] = storage_nbytes(out)
        return out


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward, once per storage, attributed to the running block."""

    def __init__(self, model: nn.Module, param_keys: set[int]):
        self.param_keys = param_keys
        self.saved: dict[int, int] = {}  # storage key -> bytes (keys only: holding tensors would distort peaks)
        self.ckpt_inputs: dict[int, int] = {}
        self.by_block: dict[str, dict[str, dict[int, int]]] = {}
        self._stack: list[str] = []
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, BLOCKS):
                self._handles += [
                    module.register_forward_pre_hook(self._pre(name, module)),
                    module.register_forward_hook(self._post),
                ]

    def _pre(self, name: str, module: nn.Module):
        def hook(_, args):
            self._stack.append(name)
            entry = self.by_block.setdefault(name, {"inputs": {}, "saved": {}})
            for a in args:
                if isinstance(a, torch.Tensor):
                    entry["inputs"][storage_key(a)] = storage_nbytes(a)
                    if module.gradient_checkpointing and torch.is_grad_enabled():
                        self.ckpt_inputs[storage_key(a)] = storage_nbytes(a)  # kept alive by torch.utils.checkpoint
        return hook

    def _post(self, *_) -> None:
        self._stack.pop()  # returns None: a forward hook's return value would replace the output

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        k = storage_key(t)
        if k not in self.param_keys:
            self.saved.setdefault(k, storage_nbytes(t))
            if self._stack:
                self.by_block[self._stack[-1]]["saved"].setdefault(k, storage_nbytes(t))
        return t

    def block_bytes(self) -> dict[str, int]:
        """Bytes a block saves besides its inputs: what recomputing it under checkpointing re-allocates."""
        return {n: sum(b for k, b in e["saved"].items() if k not in e["inputs"]) for n, e in self.by_block.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
