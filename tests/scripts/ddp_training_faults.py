"""Run by tests/models/test_training_faults_ddp.py: 2-process CPU DDP (gloo) runs with a fault injected.

    ddp_training_faults.py OUT nan-ldm|nan-ae      NaN images on rank 1 only, at the 2nd batch: both ranks skip it
    ddp_training_faults.py OUT raise RANK          RuntimeError on RANK before the backward pass of batch 2, with
                                                   ModelCheckpoint(save_on_exception=True) (a barrier in on_exception)
    ddp_training_faults.py OUT hang RANK           the same, and a later on_exception hook of RANK that never returns
    ddp_training_faults.py OUT preempt             a long run with PreemptionCheckpoint (the test sends the signal)

Lightning's DDP launcher re-executes this command line for rank 1. Each rank that ends normally writes
OUT/rank{r}.json; StepMarker writes OUT/steps-rank{r}.txt.
"""

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_VAE, make_ldm_assets, tiny_ldm_kwargs, write_tiny_dataset  # noqa: E402
from step_marker import StepMarker  # noqa: E402

from ldm.data import ImageCaptionDataModule  # noqa: E402
from ldm.models import AutoencoderKL, LatentDiffusion, PreemptionCheckpoint, RankFailureExit  # noqa: E402


class NaNImagesOnRank1(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.fit_loop.total_batch_idx == 1:
            batch["image"].fill_(float("nan"))


class HangOnException(pl.Callback):
    def __init__(self, rank: int):
        self.rank = rank

    def on_exception(self, trainer, pl_module, exception):
        if trainer.global_rank == self.rank:
            print(f"rank {self.rank}: on_exception hook hanging", file=sys.stderr, flush=True)
            time.sleep(3600)


class FailOn(pl.Callback):
    """Raises on one rank just before the backward pass of a training batch, while the other rank goes on into the
    gradient all-reduce."""

    def __init__(self, rank: int, batch: int):
        self.rank, self.batch = rank, batch

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_rank == self.rank and trainer.fit_loop.epoch_loop.batch_idx == self.batch:
            raise RuntimeError(f"injected failure on rank {self.rank} at batch {self.batch}")


def main(out: Path, mode: str, rank: int) -> None:
    trainer_args = dict(accelerator="cpu", devices=2, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out)
    callbacks: list[pl.Callback] = [StepMarker(str(out / "steps"))]
    if mode == "nan-ldm":
        if not (out / "assets" / "vae" / "config.json").exists():  # rank 0 runs first; rank 1 is launched after
            make_ldm_assets(out / "assets")
        assets = {"data": out / "assets" / "data", "vae": out / "assets" / "vae", "tokenizer": out / "assets" / "tokenizer"}
        data = assets["data"]
        pl.seed_everything(0)
        model = LatentDiffusion(**tiny_ldm_kwargs(assets))
        strategy = "ddp"
        callbacks.append(NaNImagesOnRank1())
    else:
        data = out / "data"
        if not (data / "metadata.jsonl").exists():
            write_tiny_dataset(data, n=32)
        pl.seed_everything(0)
        model = AutoencoderKL(**TINY_VAE, disc_start=0 if mode == "nan-ae" else 1000, scale_factor_batches=0,
                              learning_rate=1e-3)
        strategy = "ddp_find_unused_parameters_true"  # the discriminator sits out the autoencoder's half of a step
        if mode == "nan-ae":
            callbacks.append(NaNImagesOnRank1())
        elif mode in ("raise", "hang"):
            callbacks += [FailOn(rank, batch=2), RankFailureExit(exit_timeout=5),
                          pl.callbacks.ModelCheckpoint(dirpath=str(out / "ckpt"), save_on_exception=True)]
            if mode == "hang":
                callbacks.append(HangOnException(rank))
            trainer_args.update(enable_checkpointing=True, max_epochs=20)
        elif mode == "preempt":
            callbacks += [PreemptionCheckpoint(), RankFailureExit(),
                          pl.callbacks.ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True)]
            trainer_args.update(enable_checkpointing=True, max_epochs=-1, max_steps=100_000)
        else:
            raise SystemExit(f"unknown mode {mode}")
    trainer = pl.Trainer(strategy=strategy, callbacks=callbacks, **trainer_args)
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(data), batch_size=4, val_fraction=0.25))
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    info = {"global_step": trainer.global_step, "nonfinite_steps": model.nonfinite_steps, "checksum": checksum,
            "finite": finite, "train_batches": trainer.num_training_batches}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
