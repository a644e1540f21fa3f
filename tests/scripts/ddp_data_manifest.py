"""Run by tests/data/test_data_manifest.py in a subprocess: a 2-process CPU DDP fit of a trivial model
on the ImageCaptionDataModule. Each rank counts the images it decoded at set-up and writes
OUT/rank{r}.json, so the test can check that only one rank scanned.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

import ldm.data.scan as scan_module
from ldm.data import ImageCaptionDataModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import write_tiny_dataset  # noqa: E402

DECODED: list[str] = []


def _counting_load_rgb(path, _real=scan_module.load_rgb):
    DECODED.append(str(path))
    return _real(path)


class MeanColour(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return (batch["image"].mean(dim=(0, 2, 3)) - self.bias).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path) -> None:
    data = out / "data"
    if not (data / "metadata.jsonl").exists():
        write_tiny_dataset(data, n=16, size=8)
        (data / "images" / "005.png").write_bytes(b"broken")
    scan_module.load_rgb = _counting_load_rgb
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out,
    )
    dm = ImageCaptionDataModule(root=str(data), image_size=8, batch_size=2, val_fraction=0.0, scan_workers=1)
    trainer.fit(MeanColour(), datamodule=dm)
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"decoded": len(DECODED), "skipped": [Path(p).name for p, _ in dm.skipped],
                    "train": len(dm.train_dataset), "sizes": len(dm.image_sizes)})
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
