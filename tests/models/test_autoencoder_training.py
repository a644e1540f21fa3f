"""AutoencoderKL under the Lightning Trainer: fit (with the discriminator phase), validation, save/load."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ldm.data import ImageCaptionDataModule
from ldm.models import AutoencoderKL, SavePretrained


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=pl.loggers.TensorBoardLogger(tmp_path / "logs", name="vae"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _datamodule(root: Path) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(root=str(root), image_size=32, batch_size=4, val_fraction=0.25)


def _disc_params(model: AutoencoderKL) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.loss.discriminator.parameters()]


def test_fit_trains_autoencoder_then_discriminator(tmp_path, tiny_dataset, tiny_vae_kwargs):
    pl.seed_everything(0)
    model = AutoencoderKL(**tiny_vae_kwargs, learning_rate=1e-3, disc_start=3, scale_factor_batches=2)
    vae_before = [p.detach().clone() for p in model.vae.parameters()]
    disc_before = _disc_params(model)
    trainer = _trainer(tmp_path, limit_train_batches=5, limit_val_batches=1)
    trainer.fit(model, datamodule=_datamodule(tiny_dataset))

    assert any(not torch.equal(a, b) for a, b in zip(vae_before, model.vae.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, model.loss.discriminator.parameters()))
    metrics = trainer.callback_metrics
    for key in ("train/disc_loss", "train/g_loss", "train/d_weight", "train/kl_loss", "val/psnr", "val/ssim"):
        assert key in metrics, key
    assert torch.isfinite(metrics["val/psnr"])
    # Two of the five batches ran the discriminator: 5 autoencoder + 2 discriminator optimiser steps.
    assert trainer.global_step == 7
    # The latent scaling factor was measured on the training data at the end of fit.
    assert float(model.scaling_factor) != 1.0 and float(model.scaling_factor) > 0
    grids = sorted((Path(trainer.log_dir) / "reconstructions").glob("step_*.png"))
    assert grids, "validation wrote no reconstruction grid"
    assert list(Path(trainer.log_dir).glob("events.out.tfevents.*"))


def test_discriminator_stays_untouched_before_disc_start(tmp_path, tiny_dataset, tiny_vae_kwargs):
    pl.seed_everything(0)
    model = AutoencoderKL(**tiny_vae_kwargs, disc_start=1000, scale_factor_batches=0)
    disc_before = _disc_params(model)
    trainer = _trainer(tmp_path, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(model, datamodule=_datamodule(tiny_dataset))
    assert all(torch.equal(a, b) for a, b in zip(disc_before, model.loss.discriminator.parameters()))
    assert "train/disc_loss" not in trainer.callback_metrics
    assert trainer.global_step == 3
    assert float(model.scaling_factor) == 1.0  # scale_factor_batches=0 keeps it


def test_without_discriminator_there_is_one_optimizer(tmp_path, tiny_dataset, tiny_vae_kwargs):
    model = AutoencoderKL(**{**tiny_vae_kwargs, "disc_weight": 0.0}, scale_factor_batches=0)
    assert model.loss.discriminator is None
    trainer = _trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=_datamodule(tiny_dataset))
    assert len(trainer.optimizers) == 1 and trainer.global_step == 2


def test_measure_scaling_factor_is_one_over_latent_std(tiny_dataset, tiny_vae_kwargs):
    model = AutoencoderKL(**tiny_vae_kwargs)
    dm = _datamodule(tiny_dataset)
    dm.setup("fit")
    images = torch.cat([dm.train_dataset[i]["image"][None] for i in range(len(dm.train_dataset))])
    loader = [{"image": images[:8]}, {"image": images[8:]}]
    torch.manual_seed(3)
    scale = model.measure_scaling_factor(loader)
    torch.manual_seed(3)
    with torch.no_grad():
        z = torch.cat([model.vae.encode(b["image"]).sample() for b in loader])
    assert scale == pytest.approx(1.0 / z.double().std(unbiased=False).item(), rel=1e-6)
    assert float(model.scaling_factor) == pytest.approx(scale)
    latents = model.encode(images[:2])
    assert torch.allclose(latents, model.vae.encode(images[:2]).mode() * scale)


def test_save_pretrained_round_trip_is_bit_identical(tmp_path, tiny_dataset, tiny_vae_kwargs):
    pl.seed_everything(0)
    model = AutoencoderKL(**tiny_vae_kwargs, disc_start=1, scale_factor_batches=1)
    trainer = _trainer(tmp_path, limit_train_batches=3, limit_val_batches=0, callbacks=[SavePretrained(str(tmp_path / "exported"))])
    trainer.fit(model, datamodule=_datamodule(tiny_dataset))

    folder = tmp_path / "exported"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "discriminator.safetensors"}
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["ch"] == tiny_vae_kwargs["vae"]["ch"]
    assert config["scaling_factor"] == pytest.approx(float(model.scaling_factor))

    loaded = AutoencoderKL.from_pretrained(folder)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    model.eval(), loaded.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))


def test_from_pretrained_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "LatentDiffusion"}))
    with pytest.raises(ValueError, match="LatentDiffusion"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_resume_from_last_checkpoint_continues_where_it_stopped(tmp_path, tiny_dataset, tiny_vae_kwargs):
    ckpt_dir = tmp_path / "ckpt"

    def run(max_epochs: int, ckpt_path: str | None) -> tuple[pl.Trainer, AutoencoderKL]:
        pl.seed_everything(0)
        model = AutoencoderKL(**tiny_vae_kwargs, disc_start=2, scale_factor_batches=0)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
        trainer = _trainer(tmp_path, max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=0,
                           enable_checkpointing=True, callbacks=[checkpoint])
        trainer.fit(model, datamodule=_datamodule(tiny_dataset), ckpt_path=ckpt_path)
        return trainer, model

    first, first_model = run(1, None)
    assert first.global_step == 4  # 3 autoencoder steps + 1 discriminator step (batch index 2)
    disc_after_first = _disc_params(first_model)
    resumed, resumed_model = run(2, str(ckpt_dir / "last.ckpt"))
    assert resumed.current_epoch == 2
    # The batch counter was restored, so every batch of epoch 2 is past disc_start: 3 + 3 more steps.
    assert resumed.global_step == 10
    assert any(not torch.equal(a, b) for a, b in zip(disc_after_first, resumed_model.loss.discriminator.parameters()))
