"""The CPU thread policy of the ``ldm`` command: on a busy machine, OpenMP threads sleep instead of spinning.

torch's OpenMP threads spin-wait at every barrier by default. On a machine shared with another
CPU-bound process (a second job, a test run) the spinning threads take the cores the working ones need;
on 2 cores the digits demo's training step ran 4x slower beside one busy process and up to 40x beside
another torch process. ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep) degrades gracefully: 1.3x
slower when busy. But it costs about a third of the speed of small-op training on an idle machine
(`benchmarks/thread_policy.py` measures every policy both ways; figures in the README).

So the ``ldm`` command (and the test suite) look before torch loads: `busy_cores` samples ``/proc/stat``
for a quarter of a second, while this process is idle, and if other processes keep at least half a core
busy, `apply_thread_policy` sets ``OMP_WAIT_POLICY=PASSIVE`` and says so on stderr. OpenMP reads the
variable once, when torch loads its runtime, so the decision holds for the whole run. A value already in
the environment is kept (``OMP_WAIT_POLICY=ACTIVE`` or ``PASSIVE`` chooses); with ``OMP_NUM_THREADS=1`` (no
thread waits for another) or without ``/proc/stat`` nothing is probed or changed. Python code that imports torch itself can set the variable before importing it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

__all__ = ["BUSY_THRESHOLD", "apply_thread_policy", "busy_cores"]

BUSY_THRESHOLD = 0.5  # cores kept busy by other processes that make OpenMP threads sleep while waiting


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def busy_cores(interval: float = 0.25) -> float | None:
    """Cores kept busy by all processes over ``interval`` seconds (this one sleeps meanwhile); None without /proc/stat."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def apply_thread_policy(probe: Callable[[], float | None] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep the CPUs busy (``probe()`` >= `BUSY_THRESHOLD`
    cores), unless the variable is set, torch is already loaded or ``OMP_NUM_THREADS=1``; True if it was set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules or os.environ.get("OMP_NUM_THREADS") == "1":
        return False  # the user chose, too late to choose, or one thread: nothing waits at a barrier
    busy = (probe or busy_cores)()
    if busy is None or busy < BUSY_THRESHOLD:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    print(f"ldm: other processes keep {busy:.1f} of {os.cpu_count()} CPU cores busy; torch's threads will sleep while "
          "waiting (OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY=ACTIVE to override)", file=sys.stderr)
    return True
