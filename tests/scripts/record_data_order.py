"""Train a do-nothing model on a folder with ``ImageCaptionDataModule`` and record the sample indices of every step.

    python record_data_order.py DATA OUT_DIR --max-steps 12 [--kill-at 7] [--resume] [--devices 2] [--workers 2]

Each rank appends ``{"step": global_step, "rank": r, "index": [...]}`` to ``OUT_DIR/order-rank{r}.jsonl``; a
checkpoint is written after every step (``OUT_DIR/ckpt/last.ckpt``). ``--kill-at K``: SIGKILL the whole process
group when step K + 1 is about to start (so the last checkpoint is step K's). ``--resume``: continue from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ldm.data import ImageCaptionDataModule, StreamingImageCaptionDataModule


class Recorder(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        with open(Path(self.out) / f"order-rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.global_step, "rank": self.global_rank, "index": batch["index"].tolist()}) + "\n")
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shards", default=None, help="stream from these 'ldm data optimize' shards instead of DATA")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.shards:
        dm = StreamingImageCaptionDataModule(root=args.shards, image_size=8, batch_size=args.batch_size,
                                             num_workers=args.workers, seed=3)
    else:
        dm = ImageCaptionDataModule(root=args.data, image_size=8, batch_size=args.batch_size, num_workers=args.workers,
                                    val_fraction=0.0, seed=3)
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)]
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=args.max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=out)
    trainer.fit(Recorder(str(out)), datamodule=dm, ckpt_path=str(out / "ckpt" / "last.ckpt") if args.resume else None)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
