"""Speed settings of a model that leave its weights and state-dict keys alone: ``torch.compile`` in place and the
channels_last memory format.

:func:`compile_in_place` uses :meth:`torch.nn.Module.compile`, which compiles the module's call but keeps the module
itself: its ``state_dict`` has the same keys as before (no ``_orig_mod.`` prefix, which ``torch.compile(module)``'s
wrapper would add), so saving, EMA and checkpoints are unaffected. The compilation happens at the first call.

Costs and gains: on these projects' 2-core CPUs (measured), compiling an
SD-shaped UNet's training step takes about 3 minutes and runs no faster than eager (0.9x), and channels_last changes
nothing (0.98x-1.02x); on a GPU both pay (published: SD 1.5 at 512 px on an A100, 31 it/s eager SDPA fp16 ->
47 it/s compiled + channels_last; ``benchmarks/gpu.py`` measures ours).
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes; ``reduce-overhead`` also captures CUDA graphs (on CUDA devices; ignored on a CPU)."""


def compile_mode(setting: bool | str | None, what: str = "compile") -> str | None:
    """The ``torch.compile`` mode a user setting asks for: ``None`` for False/None (no compilation), ``"default"`` for
    True, else one of :data:`COMPILE_MODES` (``"true"``/``"false"`` strings as their booleans).

    Raises:
        ValueError: naming ``what`` and the modes, for anything else.
    """
    if isinstance(setting, str) and setting.lower() in ("true", "false"):
        setting = setting.lower() == "true"
    if setting is None or setting is False:
        return None
    if setting is True:
        return "default"
    if isinstance(setting, str) and setting in COMPILE_MODES:
        return setting
    raise ValueError(f"{what}={setting!r}: use true/false or a torch.compile mode, one of {', '.join(COMPILE_MODES)}")


def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether ``mode`` captures CUDA graphs, whose outputs the next call overwrites."""
    return mode == "reduce-overhead"


def compile_in_place(module: nn.Module, mode: str = "default", backend: str = "inductor", fullgraph: bool = False,
                     dynamic: bool | None = None) -> nn.Module:
    """Compile ``module``'s forward with ``torch.compile`` in place (:meth:`torch.nn.Module.compile`); returns it.

    Args:
        module: The model; its class, parameters and state-dict keys stay as they are (compiling again replaces the
            earlier compilation).
        mode: One of :data:`COMPILE_MODES` (only the ``inductor`` backend reads it).
        backend: ``inductor`` (the real one); ``eager``/``aot_eager`` trace without generating code (tests, debugging).
        fullgraph: Fail on a graph break instead of splitting the graph (our UNet compiles to one graph).
        dynamic: ``torch.compile``'s ``dynamic``: None marks sizes dynamic once a second size is seen.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    kwargs = {"mode": mode} if backend == "inductor" else {}
    module.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_in_place` (``module.compile()``) was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store ``module``'s 4-D weights (the convolutions') in channels_last (NHWC) layout, in place; returns it.

    Convolutions then run in NHWC, which tensor-core GPUs prefer (with bf16/fp16). Values and state-dict keys are
    unchanged; our writers save contiguous copies.
    """
    return module.to(memory_format=torch.channels_last)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last layout when it is a 4-D batch (so the first convolution needs no conversion)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class CudaGraphSteps(nn.Module):
    """Calls of a module compiled with ``mode="reduce-overhead"`` (CUDA graphs) made safe to repeat: each call starts a
    new CUDA-graph step and returns a copy of the output, which the next replay would overwrite. A transient wrapper
    for a sampling loop (keep it out of a model's attributes: its state-dict keys would gain a ``module.`` prefix)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.module(*args, **kwargs).clone()
