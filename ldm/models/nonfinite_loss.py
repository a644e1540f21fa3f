"""Skipping training steps whose loss is not finite, shared by ``LatentDiffusion`` and ``AutoencoderKL``.

A NaN or inf loss would write NaN into every weight it reaches (and into AdamW's moments), so such a step is skipped
instead: no optimiser update. Under DDP the decision is taken on every rank together (a step is skipped when its
loss is not finite on *any* rank), since ranks that disagreed would leave each other waiting in a collective.

With automatic optimisation (``LatentDiffusion``) the backward pass still runs (DDP needs every rank's, and Lightning
refuses a ``None`` loss under DDP), then :meth:`NonFiniteLossSkipping.on_before_optimizer_step` drops the gradients,
so AdamW leaves weights and moments untouched (under fp16 ``GradScaler`` finds the NaN gradients and skips the step
itself). The global step and the learning-rate schedule still advance, so ``max_steps``, the per-step noise seeds
and a resumed run stay tied to the batches seen; an EMA callback takes its per-step update, towards the unchanged
weights. With manual optimisation (``AutoencoderKL``) the module does not call ``backward``/``step``, so nothing
advances.

A few non-finite steps are survivable (one bad batch, a rare fp16 overflow); many in a row are not, so after
``max_consecutive`` of them training stops with :class:`NonFiniteLossError`, naming the step and the likely causes.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

LIKELY_CAUSES = (
    "a learning rate too high for this model or batch size (lower it, or add warm-up steps); "
    "fp16 overflow (train with --trainer.precision bf16-mixed or 32-true); "
    "bad data (NaN/inf in the images, cached latents or text embeddings: check the dataset and the latent cache); "
    "or NaN/inf weights in the checkpoint training started from (init_from, --ckpt_path)"
)


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or inf for more steps in a row than the model's ``max_consecutive_nonfinite``."""


class NonFiniteLossSkipping:
    """Mixin for a ``LightningModule``: :meth:`skip_nonfinite_loss` decides (on every rank alike) whether to skip a
    training step whose loss is NaN/inf, counts skipped steps (logged as ``train/nonfinite_steps``), warns naming the
    step, and raises :class:`NonFiniteLossError` after too many in a row.

    The counts cover the current run (they start at 0 again when training resumes from a checkpoint).
    """

    #: How the limit is set, for the error message (``--model.<this>``).
    nonfinite_setting: str = "max_consecutive_nonfinite"

    @property
    def nonfinite_steps(self) -> int:
        """Training steps skipped in this run because their loss was not finite."""
        return getattr(self, "_nonfinite_total", 0)

    def skip_nonfinite_loss(self, *losses: torch.Tensor, max_consecutive: int) -> bool:
        """Whether to skip this training step: True when any of ``losses`` is NaN/inf on any rank (then the step is
        counted and a warning names it); False resets the run of consecutive non-finite steps. Every rank must call
        it at the same point of the step (it all-reduces the decision). Under automatic optimisation return the loss
        all the same: the optimiser step is then dropped after the backward pass.

        Raises:
            NonFiniteLossError: the ``max_consecutive``-th non-finite step in a row (``0``: never).
        """
        finite = self.losses_finite(*losses)
        self.record_step(finite, max_consecutive)
        if not finite and self.automatic_optimization:
            self._drop_optimizer_step = True  # in on_before_optimizer_step, after the backward pass
        return not finite

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Automatic optimisation after a skipped step: drop the gradients so the optimiser leaves weights and state
        alone (AdamW skips parameters without a gradient). Not when ``GradScaler`` runs an optimiser that unscales by
        itself (fused AdamW under fp16), which needs the gradients to find them non-finite and skip the step."""
        if not getattr(self, "_drop_optimizer_step", False):
            return
        self._drop_optimizer_step = False
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.zero_grad(set_to_none=True)

    def losses_finite(self, *losses: torch.Tensor) -> bool:
        """Whether every one of ``losses`` is finite on every rank (one all-reduce under DDP)."""
        local = all(bool(torch.isfinite(loss.detach()).all()) for loss in losses)
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return local
        self._loss_finite_here = local  # when the decision is "not finite" but this is True, another rank's was not
        return trainer.strategy.reduce_boolean_decision(local, all=True)

    def record_step(self, finite: bool, max_consecutive: int) -> None:
        """Count a training step as finite or skipped (see :meth:`skip_nonfinite_loss`) and log the count."""
        if finite:
            self._nonfinite_consecutive = 0
        else:
            self._nonfinite_total = self.nonfinite_steps + 1
            self._nonfinite_consecutive = getattr(self, "_nonfinite_consecutive", 0) + 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False, batch_size=1)
        if finite:
            return
        step, run = self.global_step, self._nonfinite_consecutive
        where = " on another rank" if getattr(self, "_loss_finite_here", False) else ""
        if max_consecutive > 0 and run >= max_consecutive:
            raise NonFiniteLossError(
                f"the training loss was NaN/inf{where} for {run} steps in a row, the last at global step {step} "
                f"({self.nonfinite_steps} skipped in this run); stopping. Likely causes: {LIKELY_CAUSES}. "
                f"--model.{self.nonfinite_setting} sets this limit (0: never stop)")
        if self._trainer is None or self.trainer.is_global_zero:
            limit = f" (training stops at {max_consecutive})" if max_consecutive > 0 else ""
            log.warning("global step %d: the training loss is NaN/inf%s; skipped the step (no weight update). "
                        "%d non-finite step(s) in this run, %d in a row%s", step, where, self.nonfinite_steps, run, limit)
