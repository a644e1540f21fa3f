"""What the side-by-side benchmarks share: a description of the machine, interleaved timing, and the profiler table.

Imported by the sibling scripts (``unet_step.py``, ``generation.py``, ``cache_throughput.py``, ``gpu.py``), which
put this folder on ``sys.path`` however they are run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch


def parser_from_doc(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows a script's docstring: its first line, then the rest as written."""
    head, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=head, epilog=rest.lstrip("\n"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` says elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line naming what the figures were taken on: CPU, cores, torch threads, OMP_NUM_THREADS, torch and GPU."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads (OMP_NUM_THREADS={omp}), {gpu}")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a timer measures it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int | None = None, warmup: int = 2,
                      device: torch.device | str = "cpu", slow_call_s: float = 2.0) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn (``a, b, a, b, ...``) so that all see the same
    machine state, after ``warmup`` untimed rounds. ``repeats=None``: 10 timed rounds, or 3 when a call of the last
    warm-up round took over ``slow_call_s`` seconds."""
    slowest = 0.0
    for _ in range(warmup):
        slowest = 0.0  # of the last round: the first may pay one-off costs
        for fn in fns.values():
            start = time.perf_counter()
            fn()
            synchronize(device)
            slowest = max(slowest, time.perf_counter() - start)
    if repeats is None:
        repeats = 3 if slowest > slow_call_s else 10
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class OpProfile:
    """The ops with the most self CPU time in a profile: ``(name, share of all self CPU time, calls per step)``,
    and the total self CPU milliseconds per step."""

    ops: list[tuple[str, float, int]]
    total_ms: float


def top_ops(fn: Callable[[], object], calls: int = 3, limit: int = 15) -> OpProfile:
    """Profile ``calls`` calls of ``fn`` with ``torch.profiler`` (after one untimed call). Shares, unlike times, stay
    meaningful on a busy machine when torch runs one thread (OMP_NUM_THREADS=1)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm caches (allocator, oneDNN primitives) outside the profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [(e.key, e.self_cpu_time_total / total, e.count // calls) for e in events[:limit]]
    return OpProfile(ops, total / calls / 1000)


def print_side_by_side(title: str, columns: Mapping[str, OpProfile], width: int = 44) -> None:
    """Print :func:`top_ops` tables next to each other, one column per model."""
    names = list(columns)
    print(f"\n{title}: top ops by self CPU time (share of the model's total; calls per step)")
    print("  ".join(f"{f'{name} (total self CPU {columns[name].total_ms:.1f} ms/step)':{width + 14}s}" for name in names))
    for row in range(max(len(v.ops) for v in columns.values())):
        cells = []
        for name in names:
            ops = columns[name].ops
            if row < len(ops):
                op, share, count = ops[row]
                cells.append(f"{op[:width]:{width}s} {100 * share:5.1f}% {count:5d}  ")
            else:
                cells.append(" " * (width + 14))
        print("  ".join(cells))
