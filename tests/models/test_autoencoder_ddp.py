import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.models import AutoencoderKL

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_fit_autoencoder.py"


def test_two_process_cpu_ddp_fit_keeps_replicas_identical(tmp_path):
    with socket.socket() as sock:  # a free port, so concurrent DDP runs on this machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # Its own session, so a hung rank can be killed with its launcher.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("DDP run hung:\n" + output[-3000:])
    assert proc.returncode == 0, output[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # 24 training images / 2 ranks / batch 4 = 3 batches per rank per epoch, 2 epochs; the
    # discriminator steps from batch 2 on: 6 autoencoder + 4 discriminator optimiser steps.
    assert [r["train_batches"] for r in ranks] == [3, 3]
    assert [r["global_step"] for r in ranks] == [10, 10]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert ranks[0]["scaling_factor"] == ranks[1]["scaling_factor"] != 1.0
    loaded = AutoencoderKL.from_pretrained(tmp_path / "model")
    assert float(loaded.scaling_factor) == pytest.approx(ranks[0]["scaling_factor"])
