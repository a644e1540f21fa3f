"""Run by tests/models/test_latent_diffusion_ddp.py: 2-process CPU DDP (gloo) fit of a tiny LatentDiffusion
with the latent cache. Each rank writes what it ended with to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ddp_ldm_assets, fit_two_rank_ddp, tiny_ldm_kwargs  # noqa: E402

from ldm.models import LatentDiffusion  # noqa: E402


def main(out: Path) -> None:
    assets = ddp_ldm_assets(out / "assets")
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets, cache_dir=str(out / "cache")))
    trainer = fit_two_rank_ddp(model, out, assets, enable_checkpointing=False)
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    info = {"global_step": trainer.global_step, "world_size": trainer.world_size, "checksum": checksum,
            "train_batches": trainer.num_training_batches}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
