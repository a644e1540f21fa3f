"""LatentDiffusion's ``compile`` and ``channels_last``: the same loss as the plain model, a fit with validation
sampling, and checkpoints/exports whose keys carry no ``_orig_mod.`` prefix. Compilation uses the ``aot_eager``
backend here (traced, no code generation: fast and CI-safe)."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open

import ldm.models.latent_diffusion as latent_diffusion_module
from conftest import tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule
from ldm.models import LatentDiffusion, SavePretrained
from ldm.nn.speedups import compile_in_place, is_compiled
from ldm.pipeline import LatentDiffusionPipeline


def test_compiled_channels_last_model_matches_trains_and_saves_plain_keys(tmp_path, ldm_assets, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(latent_diffusion_module, "compile_in_place", partial(compile_in_place, backend="aot_eager"))
    pl.seed_everything(0)
    reference = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets), compile="default", channels_last=True)
    model.load_state_dict(reference.state_dict())
    assert is_compiled(model.unet) and not is_compiled(reference.unet)
    assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert model.hparams.compile == "default" and model.hparams.channels_last is True

    dm = ImageCaptionDataModule(root=str(ldm_assets["data"]), batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses = [m.diffusion_loss(batch, torch.Generator().manual_seed(3), 0.0) for m in (reference, model)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)

    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[checkpoints, SavePretrained(str(tmp_path / "export"))], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)  # training steps and validation sampling through the compiled UNet
    assert trainer.global_step == 2

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k] and state.keys() == reference.state_dict().keys()
    with safe_open(str(tmp_path / "export" / "unet" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(reference.unet.state_dict())
    for source in (tmp_path / "export", tmp_path / "ckpt" / "last.ckpt"):  # a pipeline reads both, uncompiled
        pipe = LatentDiffusionPipeline.from_pretrained(source)
        assert not is_compiled(pipe.unet)
        for key, value in model.unet.state_dict().items():
            assert torch.equal(pipe.unet.state_dict()[key], value), (source, key)


@pytest.mark.parametrize("setting", ["fastest", "yes"])
def test_unknown_compile_setting_is_refused(ldm_assets, setting):
    with pytest.raises(ValueError, match=f"compile='{setting}'"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets), compile=setting)
