"""``RankFailureExit``: under DDP, an exception on one rank ends the whole job promptly with a non-zero status.

What happens without it: the failing rank runs Lightning's ``on_exception`` hooks, tears down and exits; the other
ranks, blocked in a collective (the gradient all-reduce, a barrier), learn of it when its connections close at its
exit (gloo at once; NCCL only at the process-group timeout, 30 min by default, unless a launcher kills them). But a
hook of the failing rank that runs a collective (``ModelCheckpoint(save_on_exception=True)`` saves behind a barrier)
meets ranks that are in another collective, and then no rank ever exits. And when the failing rank is the one that
started the others (Lightning's subprocess launcher: ``ldm fit --trainer.devices N`` starts ranks 1..N-1 from rank
0), they outlive it. (Lightning's launcher does kill everything when one of those children exits non-zero, and
torchrun kills its other workers when one fails.)

On an exception in a multi-process run (any but a clean stop such as :class:`~ldm.models.preemption.PreemptionExit`)
this callback, on the failing rank:

1. destroys the process group, so that collectives in later hooks return at once instead of waiting for ranks that
   are not coming (Lightning's barrier, broadcast and reduce skip a group that is not initialised);
2. arms a watchdog thread that ends the process with status 1 if it is still alive ``exit_timeout`` seconds later
   (a hook, a destructor or a transport that blocks), killing the processes it started first;
3. when it started the other local ranks, kills those still running when it exits, after a 2 s grace to report an
   error of their own. It cannot wait longer: ranks blocked on this one learn of the failure only when its
   connections close, at its exit (destroying the process group does not close them).

So the failing rank always exits, non-zero and promptly, and takes the ranks it started with it; the launcher's
(rank 0's) or torchrun's status is non-zero. Ranks it did not start (other nodes, srun tasks) stop at once under gloo,
and under NCCL when their launcher kills them (``srun --kill-on-bad-exit=1``) or at the process-group timeout
(``--trainer.strategy.init_args.timeout``).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import lightning.pytorch as pl
import torch.distributed as dist

log = logging.getLogger(__name__)

CHILD_GRACE_S = 2.0  # how long a failed launching rank lets the local ranks it started exit before killing them


class RankFailureExit(pl.Callback):
    """Under a multi-process strategy, make an exception on one rank end every rank promptly with a non-zero exit
    status instead of leaving the others waiting in a collective (see :mod:`ldm.models.rank_failure`). ``ldm fit``
    always adds one (``--rank_failure.*``); a single-process run is left alone.

    Args:
        exit_timeout: Seconds a failed rank may take to run its remaining exception hooks and exit before it is
            ended with status 1 (and the local ranks it started are killed).
    """

    def __init__(self, exit_timeout: float = 60.0):
        if not exit_timeout > 0:
            raise ValueError(f"exit_timeout={exit_timeout} must be > 0 seconds")
        self.exit_timeout = exit_timeout

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size <= 1 or (isinstance(exception, SystemExit) and exception.code in (0, None)):
            return
        # Local ranks this process started (Lightning's subprocess launcher; not ddp_spawn's main process, which
        # trains on no rank and sees its workers' errors only once they ended).
        children = [p for p in getattr(trainer.strategy.launcher, "procs", [])
                    if isinstance(p, subprocess.Popen) and p.poll() is None]
        if not children and not (dist.is_available() and dist.is_initialized()):
            return
        print(f"[rank {trainer.global_rank}] {type(exception).__name__}: {exception} -- ending this rank and so the "
              f"job (the other ranks stop with an error; this rank is ended if still running in {self.exit_timeout:g} s)",
              file=sys.stderr, flush=True)
        threading.Thread(target=_exit_after, args=(self.exit_timeout, children), daemon=True,
                         name="ldm-rank-failure-watchdog").start()
        if children:
            atexit.register(_end_processes, children, CHILD_GRACE_S)
        _destroy_process_group()


def _destroy_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001  (failing to tidy up must not hide the error that brought us here)
        log.warning("could not destroy the process group after the failure: %s", exc)


def _end_processes(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait up to ``timeout`` seconds in all for ``procs`` to exit, then SIGKILL those that did not (a process
    blocked in a collective does not run a SIGTERM handler)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            print(f"killing local rank process {proc.pid}: still running at the exit of the failed rank that started it",
                  file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGKILL)


def _exit_after(timeout: float, children: list[subprocess.Popen]) -> None:
    time.sleep(timeout)
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    os.write(2, f"[pid {os.getpid()}] still running {timeout:g} s after the failure: exiting with status 1\n".encode())
    os._exit(1)
