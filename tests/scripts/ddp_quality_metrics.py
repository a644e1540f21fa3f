"""Run by tests/models/test_quality_callback.py: 2-process CPU DDP (gloo) fit of a tiny LatentDiffusion with the
QualityMetrics callback and a ModelCheckpoint monitoring its figure. Each rank writes what it logged to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ddp_ldm_assets, fit_two_rank_ddp, tiny_ldm_kwargs  # noqa: E402

from ldm.models import LatentDiffusion, QualityMetrics  # noqa: E402


def main(out: Path) -> None:
    assets = ddp_ldm_assets(out / "assets")
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets, validation={"prompts": []}))
    quality = QualityMetrics(num_samples=4, steps=2, feature_cache=str(out / "cache"), feature_steps=10)
    best = ModelCheckpoint(dirpath=out / "ckpt", monitor="val/fd_data", mode="min", save_top_k=1)
    trainer = fit_two_rank_ddp(model, out, assets, limit_train_batches=2, callbacks=[quality, best])
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and k != "val/loss"}
    info = {"logged": logged, "best_score": float(best.best_model_score), "rank": trainer.global_rank}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
