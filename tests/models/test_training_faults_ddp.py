"""Training faults under 2-process CPU DDP (gloo), each run in a subprocess with a timeout
(tests/scripts/ddp_training_faults.py): a NaN loss on one rank is skipped by both, an exception on one rank ends the
whole job promptly with a non-zero status, and SIGTERM to the launching rank stops both at the same step with a
checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import finish_or_kill

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "ddp_training_faults.py"
sys.path.insert(0, str(SCRIPTS))
from step_marker import read_steps  # noqa: E402


def _start(out: Path, *args: str) -> subprocess.Popen:
    with socket.socket() as sock:  # a free port, so concurrent DDP runs on this machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    # Its own session: the test can kill whatever is left of the job, and check that nothing is.
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    return finish_or_kill(proc, timeout, "the DDP job hung")


def _job_processes_left(proc: subprocess.Popen) -> bool:
    """Whether any process of the job's session (the launcher's children included) is still alive, after a short grace."""
    for _ in range(20):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    return True


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("model", ["ldm", "ae"])
def test_nan_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, model):
    """LatentDiffusion (automatic optimisation: backward runs, the step is dropped) and AutoencoderKL (manual)."""
    proc = _start(tmp_path, f"nan-{model}")
    output = _finish(proc)
    assert proc.returncode == 0, output[-4000:]
    ranks = _ranks(tmp_path)
    assert [r["nonfinite_steps"] for r in ranks] == [1, 1]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # the replicas did not diverge
    assert all(r["finite"] for r in ranks)
    batches = 2 * ranks[0]["train_batches"]  # 2 epochs
    # LatentDiffusion: every batch is a global step; AutoencoderKL (discriminator on): 2 per finite batch.
    assert ranks[0]["global_step"] == (batches if model == "ldm" else 2 * (batches - 1))
    assert "the training loss is NaN/inf on another rank" in output  # rank 0's own loss was finite


@pytest.mark.parametrize("rank", [1, 0])
def test_an_exception_on_one_rank_ends_the_whole_job_with_an_error(tmp_path, rank):
    """The failing rank's ModelCheckpoint(save_on_exception=True) saves behind a barrier the other rank never reaches:
    without RankFailureExit both ranks wait for ever (rank 1 failing) or rank 1 outlives rank 0."""
    proc = _start(tmp_path, "raise", str(rank))
    output = _finish(proc)
    assert proc.returncode not in (0, None), output[-4000:]
    assert f"injected failure on rank {rank} at batch 2" in output
    assert not _job_processes_left(proc), "a rank outlived the job"


def test_a_failed_rank_that_hangs_in_a_hook_is_ended_by_the_watchdog(tmp_path):
    proc = _start(tmp_path, "hang", "1")
    output = _finish(proc)
    assert proc.returncode not in (0, None), output[-4000:]
    assert "on_exception hook hanging" in output and "still running 5 s after the failure" in output
    assert not _job_processes_left(proc), "a rank outlived the job"


def test_sigterm_to_the_launching_rank_stops_both_ranks_at_one_step_with_a_checkpoint(tmp_path):
    proc = _start(tmp_path, "preempt")
    deadline = time.monotonic() + 120
    while len(read_steps(tmp_path / "steps", 1)) < 2:  # both ranks are training
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the DDP run ended or stalled before 2 steps:\n" + _finish(proc, 5)[-4000:])
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # rank 0 only, as `kill PID` does; rank 1 learns of it at the batch end
    output = _finish(proc, 60)
    assert proc.returncode == 0, output[-4000:]
    steps = [read_steps(tmp_path / "steps", r) for r in (0, 1)]
    assert steps[0][-1] == steps[1][-1]  # both stopped after the same batch
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps[0][-1]
    assert f"SIGTERM: saved a checkpoint at global step {steps[0][-1]}" in output
    assert not _job_processes_left(proc)
