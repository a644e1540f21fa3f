"""The learning-rate shape: warm-up, then constant, cosine or linear decay to a final ratio, inside a real fit."""

import math

import lightning.pytorch as pl
import pytest

from conftest import tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule
from ldm.models import LatentDiffusion
from ldm.models.lr_schedule import lr_factor


def test_warmup_then_each_decay_shape():
    assert [lr_factor(s, 4, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(99, 4, 100) == 1.0  # constant
    assert lr_factor(4, 4, 104, "cosine") == 1.0 and lr_factor(54, 4, 104, "cosine") == pytest.approx(0.5)
    assert lr_factor(104, 4, 104, "cosine", 0.1) == pytest.approx(0.1) and lr_factor(500, 4, 104, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(29, 4, 54, "linear") == pytest.approx(0.5)
    cosine = [lr_factor(s, 0, 50, "cosine") for s in range(51)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:])) and cosine[-1] == pytest.approx(0.0)


def test_bad_decay_settings_are_named(ldm_assets):
    with pytest.raises(ValueError, match="lr_decay"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, optimizer={"lr_decay": "exp"}))
    with pytest.raises(ValueError, match="final_lr_ratio"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, optimizer={"final_lr_ratio": 1.5}))


def test_cosine_decay_reaches_the_final_ratio_at_max_steps(tmp_path, ldm_assets):
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, optimizer={"learning_rate": 1e-3, "warmup_steps": 2,
                                                                      "lr_decay": "cosine", "final_lr_ratio": 0.1}))
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(ldm_assets["data"]), batch_size=4, val_fraction=0.25))
    expected = [1e-3 * lr_factor(s, 2, 8, "cosine", 0.1) for s in range(8)]
    assert seen == pytest.approx(expected)
    assert seen[1] == pytest.approx(1e-3)  # peak right after warm-up
    assert seen[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6))))  # step 7 of 2 + 6
