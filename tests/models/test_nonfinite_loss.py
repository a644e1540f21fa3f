"""A NaN/inf training loss: the step is skipped (no weight or optimiser-state update) and counted, training goes on,
and too many in a row stop training with an error naming the step (LatentDiffusion and AutoencoderKL)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule
from ldm.models import AutoencoderKL, LatentDiffusion, NonFiniteLossError
from ldm.models.latent_diffusion_config import OptimizerConfig


class NaNImages(pl.Callback):
    """Bad data: fills the images of the given training batches with NaN (before ``training_step`` sees them), and
    records for each batch whether the trainable weights changed."""

    def __init__(self, batches):
        self.batches = set(batches)
        self.changed: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batches:
            batch["image"].fill_(float("nan"))
        self._before = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = [p for p in pl_module.parameters() if p.requires_grad]
        self.changed[batch_idx] = any(not torch.equal(a, b) for a, b in zip(self._before, after))


def _trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _adam_steps(trainer: pl.Trainer, index: int = 0) -> set[int]:
    return {int(state["step"]) for state in trainer.optimizers[index].state.values()}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP (GradScaler, fused AdamW) needs CUDA")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", pytest.param("16-mixed", marks=CUDA)])
def test_latent_diffusion_skips_nan_steps_and_trains_on(tmp_path, ldm_assets, caplog, precision):
    """16-mixed (CUDA): GradScaler meets the NaN gradients too and skips the fused AdamW step itself."""
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))
    nan = NaNImages({1, 2})
    ema = pl.callbacks.EMAWeightAveraging(decay=0.9)
    with caplog.at_level(logging.WARNING, logger="ldm.models.nonfinite_loss"):
        accelerator = "cuda" if precision == "16-mixed" else "cpu"
        trainer = _trainer(tmp_path, [nan, ema], limit_train_batches=5, precision=precision, accelerator=accelerator)
        trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(ldm_assets["data"]), batch_size=4, val_fraction=0.25))
    # Every batch counts as a step (the LR schedule and seeds stay tied to the data); 2 of them were skipped.
    assert trainer.global_step == 5 and model.nonfinite_steps == 2
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 2.0
    assert nan.changed == {0: True, 1: False, 2: False, 3: True, 4: True}  # and training went on after them
    assert _adam_steps(trainer) == {3}  # AdamW's moments and step count only saw the 3 finite steps
    assert _all_finite(model) and _all_finite(ema._average_model)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ldm.models.nonfinite_loss"]
    assert len(warnings) == 2 and "global step 1:" in warnings[0] and "global step 2:" in warnings[1]
    assert "2 non-finite step(s) in this run, 2 in a row" in warnings[1]


def test_latent_diffusion_stops_after_too_many_nan_steps_in_a_row(tmp_path, ldm_assets):
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, optimizer={"max_consecutive_nonfinite": 3}))
    trainer = _trainer(tmp_path, [NaNImages({1, 2, 3, 4, 5})], limit_train_batches=6)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(ldm_assets["data"]), batch_size=4, val_fraction=0.25))
    message = str(info.value)
    assert "for 3 steps in a row, the last at global step 3" in message
    for cause in ("learning rate", "bf16-mixed", "bad data", "init_from", "optimizer.max_consecutive_nonfinite"):
        assert cause in message, cause
    assert _all_finite(model)


def test_the_limit_is_a_checked_optimizer_setting():
    assert OptimizerConfig().max_consecutive_nonfinite == 10
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        OptimizerConfig(max_consecutive_nonfinite=-1)
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        AutoencoderKL(max_consecutive_nonfinite=-1)


def _ae_datamodule(root: Path) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(root=str(root), image_size=32, batch_size=4, val_fraction=0.25)


def test_autoencoder_skips_nan_steps_under_manual_optimisation(tmp_path, tiny_dataset, tiny_vae_kwargs):
    pl.seed_everything(0)
    model = AutoencoderKL(**tiny_vae_kwargs, disc_start=0, scale_factor_batches=0)
    nan = NaNImages({1})
    trainer = _trainer(tmp_path, [nan], limit_train_batches=4)
    trainer.fit(model, datamodule=_ae_datamodule(tiny_dataset))
    assert nan.changed == {0: True, 1: False, 2: True, 3: True}
    assert model.nonfinite_steps == 1 and float(trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
    assert trainer.global_step == 6  # 3 finite batches x (autoencoder + discriminator); the skipped one stepped neither
    assert _adam_steps(trainer, 0) == {3} and _adam_steps(trainer, 1) == {3}
    assert _all_finite(model)


def test_autoencoder_nan_discriminator_loss_skips_only_the_discriminator(tmp_path, tiny_dataset, tiny_vae_kwargs, monkeypatch):
    pl.seed_everything(0)
    model = AutoencoderKL(**tiny_vae_kwargs, disc_start=0, scale_factor_batches=0, max_consecutive_nonfinite=2)
    real = model.loss.discriminator_loss
    monkeypatch.setattr(model.loss, "discriminator_loss", lambda x, rec: _nan_loss(*real(x, rec)))
    trainer = _trainer(tmp_path, [], limit_train_batches=4)
    with pytest.raises(NonFiniteLossError, match="NaN/inf for 2 steps in a row, the last at global step 2"):
        trainer.fit(model, datamodule=_ae_datamodule(tiny_dataset))
    # Two autoencoder updates happened (global steps 0 and 1 -> 2); the discriminator was never updated.
    assert _adam_steps(trainer, 0) == {2} and _adam_steps(trainer, 1) == set()
    assert _all_finite(model)


def _nan_loss(loss: torch.Tensor, logs: dict) -> tuple[torch.Tensor, dict]:
    return loss * float("nan"), logs


def test_autoencoder_with_limit_zero_never_stops(tmp_path, tiny_dataset, tiny_vae_kwargs):
    pl.seed_everything(0)
    model = AutoencoderKL(**tiny_vae_kwargs, disc_start=100, scale_factor_batches=0, max_consecutive_nonfinite=0)
    trainer = _trainer(tmp_path, [NaNImages(range(4))], limit_train_batches=4)
    trainer.fit(model, datamodule=_ae_datamodule(tiny_dataset))
    assert model.nonfinite_steps == 4 and trainer.global_step == 0 and _all_finite(model)
