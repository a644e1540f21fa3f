"""The speed benchmarks run as commands: each documents its options, and benchmarks/gpu.py skips cleanly without CUDA
and runs end to end on a tiny UNet with ``--device cpu --quick``. (The figures themselves are never asserted.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str, cuda: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, *args], cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script,option", [("unet_step.py", "--profile"), ("generation.py", "--models"),
                                           ("cache_throughput.py", "--cases"), ("gpu.py", "--peak-tflops")])
def test_help_documents_the_options(script, option):
    done = _run(str(BENCHMARKS / script), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert option in done.stdout and "--quick" in done.stdout


def test_gpu_benchmark_skips_without_cuda():
    done = _run(str(BENCHMARKS / "gpu.py"), cuda=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("skipped: no CUDA GPU")


def test_gpu_benchmark_runs_end_to_end_on_a_tiny_unet_on_the_cpu():
    done = _run(str(BENCHMARKS / "gpu.py"), "--device", "cpu", "--quick", "--resolutions", "256",
                "--gen-modes", "eager", "reduce-overhead + channels_last")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    trained = [row for row in rows if row and row[0] == "256px"]
    assert [" ".join(row[1:-6]) for row in trained] == ["eager", "channels_last", "compile + channels_last"]
    assert all(float(row[-4]) > 0 for row in trained)  # images/s
    generated = [row for row in rows if row and row[0] in ("eager", "reduce-overhead")]
    assert len(generated) == 2 and all(float(row[-3]) > 0 for row in generated)  # it/s
