"""Run by tests/models/test_latent_diffusion_ddp.py: 2-process CPU DDP (gloo) fit of a tiny LatentDiffusion
with the latent cache. Each rank writes what it ended with to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ddp_ldm_assets, tiny_ldm_kwargs  # noqa: E402

from ldm.data import ImageCaptionDataModule  # noqa: E402
from ldm.models import LatentDiffusion  # noqa: E402


def main(out: Path) -> None:
    assets = ddp_ldm_assets(out / "assets")
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets, cache_dir=str(out / "cache")))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=0.25))
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    info = {"global_step": trainer.global_step, "world_size": trainer.world_size, "checksum": checksum,
            "train_batches": trainer.num_training_batches}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
