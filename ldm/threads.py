"""The CPU thread policy of the ``ldm`` command: OpenMP threads that sleep instead of spinning while they wait.

torch's OpenMP threads spin-wait at every barrier by default. On a machine shared with another
CPU-bound process (a second job, a test run, a data loader) the spinning threads steal the cores the
working ones need, and small-op training (the digits demo) ran ~40x slower on 2 cores.
``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep, which degrades gracefully when the machine is
busy and costs little when it is idle (`benchmarks/thread_policy.py` measures both; figures in the
README). OpenMP reads the variable once, when torch loads its runtime, so it must be set before
``import torch``: `apply_thread_policy` does that for the ``ldm`` command and the test suite. A value
already in the environment is kept, so ``OMP_WAIT_POLICY=ACTIVE ldm fit ...`` restores torch's default.
Python code that imports torch itself can set the variable before importing it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["DEFAULT_WAIT_POLICY", "apply_thread_policy"]

DEFAULT_WAIT_POLICY = "PASSIVE"


def apply_thread_policy() -> bool:
    """Set ``OMP_WAIT_POLICY`` to `DEFAULT_WAIT_POLICY` unless it is set or torch is already loaded; True if set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY
    return True
