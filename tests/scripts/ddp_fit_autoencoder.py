"""Run by tests/models/test_autoencoder_ddp.py in a subprocess: 2-process CPU DDP (gloo) fit.

Lightning's DDP launcher re-executes this command line for rank 1. Each rank writes what it ended
with to OUT/rank{r}.json so the test can check that the replicas agree.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from ldm.data import ImageCaptionDataModule
from ldm.models import AutoencoderKL, SavePretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_VAE, write_tiny_dataset  # noqa: E402


def main(out: Path) -> None:
    data = out / "data"
    if not (data / "metadata.jsonl").exists():
        write_tiny_dataset(data, n=32)
    pl.seed_everything(0)
    model = AutoencoderKL(**TINY_VAE, disc_start=2, scale_factor_batches=2, learning_rate=1e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_epochs=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[SavePretrained(str(out / "model"))],
    )
    dm = ImageCaptionDataModule(root=str(data), batch_size=4, val_fraction=0.25)
    trainer.fit(model, datamodule=dm)
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "global_step": trainer.global_step,
                "world_size": trainer.world_size,
                "train_batches": trainer.num_training_batches,
                "checksum": checksum,
                "scaling_factor": float(model.scaling_factor),
            }
        )
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
