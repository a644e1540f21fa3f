"""``PreemptionCheckpoint``: on SIGTERM/SIGUSR1, save a checkpoint and stop cleanly, so a requeued job resumes.

Schedulers warn a job before they end it: SLURM sends SIGTERM at pre-emption, ``scancel`` or the time limit (and
SIGKILL some seconds later), and with ``#SBATCH --signal=USR1@90`` SIGUSR1 90 s before the limit; Kubernetes and
most others send SIGTERM. This callback catches those signals while training runs. The handler only sets a flag;
at the end of the current training batch (after the optimiser step; with gradient accumulation, at the end of the
accumulation window) every rank takes the decision together (stop if any rank was signalled: under DDP the signal
may reach only some processes), the trainer saves a checkpoint, and ``fit`` ends with :class:`PreemptionExit` (a
``SystemExit`` with status 0 on every rank). ``on_train_end``/``on_fit_end`` do not run (no export of a half-trained
model, no scaling-factor pass): the run is unfinished, not failed.

Where it saves: ``last.ckpt`` in the (first) ``ModelCheckpoint``'s folder, which ``ldm fit ... --ckpt_path last``
resumes from (the newest checkpoint there); without a ``ModelCheckpoint``, Lightning's ``hpc_ckpt_N.ckpt`` in
``default_root_dir``, which ``--ckpt_path hpc`` resumes from (and which Lightning loads by itself on a SLURM requeue).

With Lightning's own signal handling: Lightning installs its handlers when ``fit`` starts (before
``on_train_start``), and restores the ones from before at the end of ``fit``. This callback installs its handlers
in ``on_train_start`` in front of Lightning's and calls the handlers they replace, except Lightning's SIGTERM
notifier: that one would end ``fit`` through its own ``SIGTERMException`` (without a checkpoint) and runs a
collective inside the signal handler under DDP; this callback takes its place. So SLURM's auto-requeue (Lightning's
SIGUSR1 handler under ``SLURMEnvironment(auto_requeue=True)``: saves ``hpc_ckpt_N.ckpt`` and runs ``scontrol
requeue``) keeps working, and the job then also stops cleanly at the end of the batch. A signal during the sanity
check or after the last batch is Lightning's alone (SIGTERM: its stop without a checkpoint; the run's own last
checkpoint follows at its normal end).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionExit(SIGTERMException):
    """Raised on every rank after the pre-emption checkpoint is written: ends ``fit`` and the process with status 0.

    A ``SIGTERMException`` (Lightning's ``SystemExit`` for a stop by signal), so ``on_exception`` hooks can tell it
    from a failure.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(0)
        self.message = message


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or SIGUSR1 (what SLURM and other schedulers send before ending a job), save a checkpoint at the end
    of the current training batch and stop with exit status 0, so the requeued job resumes where this one stopped
    (``--ckpt_path last``); see :mod:`ldm.models.preemption`. ``ldm fit`` always adds one (``--preemption.*``).

    Args:
        signals: Names of the signals that request a checkpoint and a clean stop; empty: leave every signal to
            Lightning (SIGTERM then stops training without a checkpoint, SIGUSR1 kills the process unless SLURM's
            auto-requeue handles it).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")):
        self.signals = tuple(_signal_by_name(name) for name in signals)
        self.received: signal.Signals | None = None  # the first signal received while training, if any
        self._installed: dict[signal.Signals, Any] = {}  # signal -> the handler ours replaced
        self._chained: dict[signal.Signals, list[Callable]] = {}

    # ----------------------------------------------------------------- handlers
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return
        for signum in self.signals:
            previous = signal.getsignal(signum)
            self._installed[signum] = previous
            self._chained[signum] = _handlers_to_chain(signum, previous, trainer)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        signum = signal.Signals(signum)
        if self.received is None:
            self.received = signum
            # A raw write: print() or logging here could re-enter a stream the interrupted code is writing to.
            os.write(2, f"[pid {os.getpid()}] received {signum.name}: saving a checkpoint at the end of this training "
                        "batch, then stopping\n".encode())
        for handler in self._chained.get(signum, []):
            handler(signum, frame)

    def _restore_handlers(self) -> None:
        for signum, previous in self._installed.items():
            if signal.getsignal(signum) == self._on_signal and previous is not None:  # not yet restored by Lightning
                signal.signal(signum, previous)
        self._installed, self._chained = {}, {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ----------------------------------------------------------------- the stop
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same batch, when any rank was signalled
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested or (pl_module.automatic_optimization and trainer.fit_loop._should_accumulate()):
            return
        path, resume, callback = checkpoint_target(trainer)
        if callback is not None and callback.save_last:  # its state in the file then names this file as its last
            callback.last_model_path = path
        trainer.save_checkpoint(path)
        name = self.received.name if self.received is not None else "a stop signal on another rank"
        message = (f"{name}: saved a checkpoint at global step {trainer.global_step} (epoch {trainer.current_epoch}) "
                   f"to {path} and stopped; resume with the same command plus --ckpt_path {resume}")
        if trainer.is_global_zero:
            log.info(message)
            print(message, file=sys.stderr, flush=True)
        raise PreemptionExit(message)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, PreemptionExit):
            return
        # Lightning's subprocess launcher: let the local ranks this process started finish their own stop first.
        for proc in getattr(trainer.strategy.launcher, "procs", []):
            if isinstance(proc, subprocess.Popen):
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:  # a child that does not exit is the scheduler's to kill
                    log.warning("local rank process %d did not exit within 60 s of the stop", proc.pid)


def checkpoint_target(trainer: pl.Trainer) -> tuple[str, str, ModelCheckpoint | None]:
    """Where the pre-emption checkpoint goes, the ``--ckpt_path`` value that resumes from it, and the ModelCheckpoint
    whose folder it is in: ``last.ckpt`` in the first ``ModelCheckpoint``'s folder (``last``), else Lightning's next
    ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` (``hpc``, no ModelCheckpoint). The same on every rank."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            name = callback.CHECKPOINT_NAME_LAST if "{" not in callback.CHECKPOINT_NAME_LAST else "last"
            return os.path.join(callback.dirpath, name + callback.FILE_EXTENSION), "last", callback
    path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
    return trainer.strategy.broadcast(path), "hpc", None


def _signal_by_name(name: str) -> signal.Signals:
    try:
        return signal.Signals[name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use names such as SIGTERM or SIGUSR1") from None


def _handlers_to_chain(signum: signal.Signals, previous: Any, trainer: pl.Trainer) -> list[Callable]:
    """The handlers ours calls after setting its flag: the one it replaced, or for SIGTERM the members of Lightning's
    composed handler other than Lightning's own (its notifier and SLURM's log line); none for SIG_DFL/SIG_IGN."""
    if not callable(previous):
        return []
    members = getattr(previous, "signal_handlers", None)  # Lightning's _HandlersCompose
    if signum != signal.SIGTERM or members is None:
        return [previous]
    connector = getattr(trainer, "_signal_connector", None)
    return [h for h in members if callable(h) and getattr(h, "__self__", None) is not connector]
