import json
from pathlib import Path

import pytest

from conftest import run_ddp_script
from ldm.models import AutoencoderKL

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_fit_autoencoder.py"


def test_two_process_cpu_ddp_fit_keeps_replicas_identical(tmp_path):
    run_ddp_script(SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # About 24 training images / 2 ranks / batch 4 = 3 batches per rank per epoch, 2 epochs; the
    # discriminator steps from batch 2 on: 6 autoencoder + 4 discriminator optimiser steps.
    assert [r["train_batches"] for r in ranks] == [3, 3]
    assert [r["global_step"] for r in ranks] == [10, 10]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert ranks[0]["scaling_factor"] == ranks[1]["scaling_factor"] != 1.0
    loaded = AutoencoderKL.from_pretrained(tmp_path / "model")
    assert float(loaded.scaling_factor) == pytest.approx(ranks[0]["scaling_factor"])
