import json
from pathlib import Path

import pytest

from conftest import run_ddp_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_fit_latent_diffusion.py"


def test_two_process_cpu_ddp_fit_with_latent_cache(tmp_path):
    run_ddp_script(SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] > 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2 * ranks[0]["train_batches"]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    # Each rank encoded its own share of the training set into its own shard.
    shards = sorted(p.name for p in (tmp_path / "cache").glob("latents-*/shard-*.safetensors"))
    assert shards == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
