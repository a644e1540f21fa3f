"""Training from precomputed latents without the VAE's encoder: every model layout loads its VAE decoder-only with
the same encoder fingerprint, the encoder never enters the module, its checkpoints or the device, checkpoints load
either way, exports hold the whole VAE, and image data is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_VAE, TINY_VAE_SHAPE, tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule, PrecomputedLatentsDataModule
from ldm.models import AutoencoderKL, LatentDiffusion
from ldm.formats.load import load_components
from ldm.precompute import encode_dataset
from ldm.nn.autoencoder import KLAutoencoder


def _trainer(tmp_path: Path, steps: int, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kwargs})


def _encoder_keys(keys) -> list[str]:
    return [k for k in keys if ".encoder." in f".{k}" or "quant_conv." in k.replace("post_quant_conv.", "")]


def test_the_vae_module_without_encoder_hashes_and_drops_the_encoder_weights():
    torch.manual_seed(0)
    whole = KLAutoencoder(**TINY_VAE_SHAPE)
    half = KLAutoencoder(**TINY_VAE_SHAPE, with_encoder=False)
    with pytest.raises(RuntimeError, match="load a whole VAE"):
        half.encoder_fingerprint()
    half.load_state_dict(whole.state_dict())
    assert half.encoder_fingerprint() == whole.encoder_fingerprint()
    assert not _encoder_keys(half.state_dict()) and _encoder_keys(whole.state_dict())
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in whole.parameters())
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(half.decode(z), whole.decode(z))
    with pytest.raises(RuntimeError, match="without its encoder"):
        half.encode(torch.zeros(1, 3, 32, 32))
    # Half-precision weights hash as the fp32 module they load into (what an fp32 VAE built from them would hash).
    from_half = KLAutoencoder(**TINY_VAE_SHAPE, with_encoder=False)
    from_half.load_state_dict({k: v.half() for k, v in whole.state_dict().items()})
    whole_from_half = KLAutoencoder(**TINY_VAE_SHAPE)
    whole_from_half.load_state_dict({k: v.half() for k, v in whole.state_dict().items()})
    assert from_half.encoder_fingerprint() == whole_from_half.encoder_fingerprint() != whole.encoder_fingerprint()
    # A state dict missing encoder weights or with wrong shapes is refused.
    broken = {k: v for k, v in whole.state_dict().items() if k != "encoder.conv_in.weight"}
    with pytest.raises(RuntimeError, match="encoder.conv_in.weight"):
        KLAutoencoder(**TINY_VAE_SHAPE, with_encoder=False).load_state_dict(broken)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model in our folder, SD single-file and diffusers layouts, plus a Lightning checkpoint."""
    from conftest import save_tiny_base_model
    from ldm.pipeline import LatentDiffusionPipeline

    root = tmp_path_factory.mktemp("base")
    assets, ours = save_tiny_base_model(root)
    pipe = LatentDiffusionPipeline.from_pretrained(ours)
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets))
    trainer = _trainer(root, 1, enable_checkpointing=True,
                       callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=0.25))
    return {
        "assets": assets,
        "ours": ours,
        "sd": pipe.save_pretrained(root / "base.safetensors", format="sd"),
        "diffusers": pipe.save_pretrained(root / "diffusers", format="diffusers"),
        "ckpt": root / "ckpt" / "last.ckpt",
    }


@pytest.mark.parametrize("layout", ["ours", "sd", "diffusers", "ckpt"])
def test_every_layout_loads_a_decoder_only_vae_with_the_encoders_fingerprint(base, layout):
    whole = load_components(base[layout]).vae
    half = load_components(base[layout], vae_encoder=False).vae
    assert half.encoder is None and not _encoder_keys(half.state_dict())
    assert half.encoder_fingerprint() == whole.encoder_fingerprint()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(half.decode(z), whole.decode(z), rtol=0, atol=0)


def test_training_from_latents_without_the_encoder(tmp_path, ldm_assets):
    assets = ldm_assets
    latents = tmp_path / "latents"
    encode_dataset(str(assets["data"]), assets["vae"], latents, batch_size=8, val_fraction=0.25, device="cpu")
    kwargs = tiny_ldm_kwargs(assets, validation={"prompts": []})

    pl.seed_everything(0)
    model = LatentDiffusion(**kwargs, vae_encoder=False)
    assert model.autoencoder.encoder is None
    assert not _encoder_keys(k.removeprefix("autoencoder.") for k in model.state_dict() if k.startswith("autoencoder."))
    # Training on images needs the encoder: refused before the first step, naming the fix.
    with pytest.raises(ValueError, match="vae_encoder"):
        _trainer(tmp_path, 1).fit(model, datamodule=ImageCaptionDataModule(root=str(assets["data"]), batch_size=4))

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(model, datamodule=PrecomputedLatentsDataModule(str(latents), batch_size=4))
    assert trainer.global_step == 2
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("autoencoder.decoder.") for k in state)
    assert not _encoder_keys(k.removeprefix("autoencoder.") for k in state if k.startswith("autoencoder."))

    # The run resumes without the encoder, and also with it (its weights re-read from the autoencoder folder).
    unets = []
    for vae_encoder in (False, True):
        pl.seed_everything(0)
        resumed = LatentDiffusion(**kwargs, vae_encoder=vae_encoder)
        trainer = _trainer(tmp_path, 3)
        trainer.fit(resumed, datamodule=PrecomputedLatentsDataModule(str(latents), batch_size=4), ckpt_path=str(last))
        assert trainer.global_step == 3
        assert (resumed.autoencoder.encoder is not None) == vae_encoder
        unets.append(resumed.unet.state_dict())
    torch.testing.assert_close(unets[0], unets[1], rtol=0, atol=0)  # the encoder plays no part in the step

    # A pipeline (or a fine-tune) loading the checkpoint gets the whole VAE, the source's encoder included.
    source = load_file(str(assets["vae"] / "model.safetensors"))
    vae = load_components(last).vae
    assert vae.encoder is not None
    for key in _encoder_keys(source):
        assert torch.equal(vae.state_dict()[key], source[key]), key
    assert vae.encoder_fingerprint() == model.autoencoder.encoder_fingerprint()

    # A checkpoint written with the encoder loads into a model without it (the encoder's weights are dropped).
    pl.seed_everything(0)
    with_encoder = LatentDiffusion(**kwargs)
    decoder_only = LatentDiffusion(**kwargs, vae_encoder=False)
    decoder_only.load_trained_state(with_encoder.state_dict(), "with_encoder.ckpt")
    torch.testing.assert_close(decoder_only.unet.state_dict(), with_encoder.unet.state_dict())

    # The export re-reads the encoder from the source: a complete VAE folder a pipeline loads.
    folder = model.save_pretrained(tmp_path / "export")
    exported = load_file(str(Path(folder) / "vae" / "model.safetensors"))
    assert exported.keys() == source.keys() and all(torch.equal(exported[k], source[k]) for k in source)


def test_a_foreign_vae_is_refused_without_its_encoder_too(tmp_path, ldm_assets):
    assets = ldm_assets
    encode_dataset(str(assets["data"]), assets["vae"], tmp_path / "latents", batch_size=8, val_fraction=0.25, device="cpu")
    torch.manual_seed(1)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "other_vae")
    model = LatentDiffusion(**tiny_ldm_kwargs(assets, autoencoder=str(tmp_path / "other_vae")), vae_encoder=False)
    dm = PrecomputedLatentsDataModule(str(tmp_path / "latents"), batch_size=4)
    with pytest.raises(ValueError, match="ldm data encode SRC --vae") as info:
        _trainer(tmp_path, 1).fit(model, datamodule=dm)
    assert model.autoencoder.encoder_fingerprint() in str(info.value)
