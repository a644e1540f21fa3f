"""An exponential moving average of the trained weights only: for LoRA, the adapters, not the frozen model.

Lightning's ``EMAWeightAveraging`` averages a deep copy of the whole LightningModule: under LoRA that is a second copy
of every frozen weight (for SD 1.5, 3.4 GB in fp32) averaging numbers that never change, and its checkpoints hold the
whole averaged module, so a slim LoRA checkpoint is no longer slim. `TrainableEMA` keeps one fp32 shadow of each
parameter that requires a gradient (the adapters; the whole UNet in a full fine-tune) and nothing else.

- After every optimiser step (not on gradient-accumulation micro-batches; a step skipped for a non-finite loss counts,
  its weights unchanged, as ``ldm.models.nonfinite_loss`` keeps the global step going) each shadow moves towards its
  weight by ``1 - d``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates: the
  ramp (as in diffusers' EMA) makes the average follow the weights early on, so that a decay whose horizon
  ``1 / (1 - decay)`` is longer than the run still ends near trained weights instead of the initial ones.
- Validation (its loss and sample images) runs on the averaged weights, then training continues on its own.
- At the end of training the averaged weights go into the model, so ``SavePretrained`` (at the end of fit) exports
  them; the trained weights are kept aside, so a checkpoint written after that (Lightning's ``last.ckpt`` when
  ``max_steps`` is reached) still holds them, and a run extended with a higher ``max_steps`` continues exactly.
- The shadows and the update count are this callback's state in a Lightning checkpoint: a resumed run continues the
  same average. The module's own ``state_dict`` in the checkpoint holds the weights being trained.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["TrainableEMA"]


class TrainableEMA(pl.Callback):
    """Exponential moving average of the parameters that require a gradient; the exported model gets the average.

    Args:
        decay: Largest per-step decay; the average spans about ``1 / (1 - decay)`` optimiser steps.
        warmup: Ramp the decay up as ``(1 + n) / (10 + n)`` over the first updates (False: ``decay`` from the first).
        start_step: Optimiser steps to wait before the first update (the shadows follow the weights until then).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"TrainableEMA decay={decay} must be in [0, 1)")
        if start_step < 0:
            raise ValueError(f"TrainableEMA start_step={start_step} must be >= 0")
        self.decay, self.warmup, self.start_step = float(decay), bool(warmup), int(start_step)
        self.updates = 0
        self._last_step = -1
        self._shadow: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}  # the trained parameters, found once at fit start
        self._restored: dict[str, torch.Tensor] | None = None
        self._swapped = False  # the model holds the average, the shadows the trained weights
        self._exported = False  # training ended with the average in the model (validation no longer swaps)

    def current_decay(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @staticmethod
    def _trained(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trained = self._trained(pl_module)
        if not trained:
            raise ValueError("TrainableEMA: the model has no parameter that requires a gradient, nothing to average")
        source = self._restored if self._restored is not None else {n: p.detach() for n, p in trained.items()}
        missing = sorted(set(trained) - set(source))
        if missing:
            raise ValueError(f"TrainableEMA: the checkpoint's average lacks {len(missing)} trained parameters, e.g. "
                             f"{missing[:3]}; it was written for another model or LoRA setting")
        self._shadow = {n: source[n].detach().to(device=p.device, dtype=torch.float32).clone() for n, p in trained.items()}
        self._params = trained
        self._restored = None
        self._swapped = self._exported = False
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimiser step: a gradient-accumulation micro-batch
            return
        self._last_step = step
        if step <= self.start_step:
            for name, shadow in self._shadow.items():
                shadow.copy_(self._params[name].detach())
            return
        d = self.current_decay()
        for name, shadow in self._shadow.items():
            shadow.lerp_(self._params[name].detach().to(torch.float32), 1.0 - d)
        self.updates += 1

    def _swap(self, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for name, shadow in self._shadow.items():
                weight = self._params[name]
                held = weight.detach().clone()
                weight.copy_(shadow.to(weight.dtype))
                shadow.copy_(held.to(torch.float32))
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._shadow and not self._swapped and not self._exported:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped and not self._exported:
            self._swap(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The average into the model for the export; the trained weights into the shadows, where on_save_checkpoint
        # finds them for a checkpoint written after this (ModelCheckpoint runs its train-end save after us).
        if self._shadow and not self._swapped:
            self._swap(pl_module)
        self._exported = True

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {n: t.detach().cpu() for n, t in self._shadow.items()}}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._swapped:
            return
        # Saved inside validation or after training ended (the model holds the average, the shadows the trained
        # weights): store them the right way round, so that a resumed run trains its own weights and averages on.
        state = checkpoint["state_dict"]
        mine = checkpoint["callbacks"][self.state_key]
        for name, shadow in self._shadow.items():
            mine["shadow"][name] = state[name].detach().cpu().to(torch.float32)
            state[name] = shadow.detach().cpu().to(state[name].dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self._restored = dict(state_dict["shadow"])
