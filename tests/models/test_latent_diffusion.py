"""LatentDiffusion: end-to-end fit + sample, CFG dropout, cache reuse/invalidation, resume, export."""

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_ldm_kwargs
from ldm.data import ImageCaptionDataModule, ImageCaptionDataset
from ldm.models import LatentDiffusion, SavePretrained
from ldm.diffusion import drop_captions
from ldm.pipeline import LatentDiffusionPipeline


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def _dm(assets, **kw) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=0.25, **kw)


def test_fit_sample_export_and_load_pipeline(tmp_path, ldm_assets):
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, cache_dir=str(tmp_path / "cache")))
    unet_before = [p.detach().clone() for p in model.unet.parameters()]
    logger = pl.loggers.TensorBoardLogger(tmp_path / "logs", name="ldm")
    trainer = _trainer(tmp_path, limit_train_batches=4, limit_val_batches=1, logger=logger,
                       callbacks=[pl.callbacks.EMAWeightAveraging(decay=0.9), SavePretrained(str(tmp_path / "export"))])
    trainer.fit(model, datamodule=_dm(ldm_assets))
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, model.unet.parameters()))
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/loss" in trainer.callback_metrics
    assert list((Path(logger.log_dir) / "samples").glob("step_*.png")), "validation wrote no sample grid"

    export = tmp_path / "export"
    for part in ("model_index.json", "unet/model.safetensors", "vae/model.safetensors", "text_encoder", "tokenizer", "scheduler/scheduler_config.json"):
        assert (export / part).exists(), part
    pipe = LatentDiffusionPipeline.from_pretrained(export)
    for a, b in zip(model.unet.state_dict().values(), pipe.unet.state_dict().values()):
        assert torch.equal(a, b)
    out = pipe(["image 1", "picture 2"], num_inference_steps=3, guidance_scale=3.0, seed=[5, 6])
    assert [im.size for im in out.images] == [(32, 32), (32, 32)] and out.seeds == [5, 6]
    single = pipe("picture 2", num_inference_steps=3, guidance_scale=3.0, seed=6)
    assert np.array_equal(np.asarray(single.images[0]), np.asarray(out.images[1]))
    again = pipe("picture 2", num_inference_steps=3, guidance_scale=3.0, seed=6)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(single.images[0]))


def test_caption_dropout_rate():
    g = torch.Generator().manual_seed(0)
    prompts = ["a prompt"] * 20000
    dropped = drop_captions(prompts, 0.1, g)
    rate = sum(p == "" for p in dropped) / len(prompts)
    assert 0.09 < rate < 0.11
    assert drop_captions(prompts[:10], 0.0, g) == prompts[:10]
    assert drop_captions(prompts[:10], 1.0, g) == [""] * 10


def test_a_repeated_prompt_is_encoded_once_with_the_same_context_and_gradients(ldm_assets, monkeypatch):
    torch.manual_seed(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))  # a trainable text encoder
    model.train()
    model.text_encoder.double()  # gradients summed in another order: compared in float64
    prompts = ["image 1", "picture 2", "image 1", "image 1", "", "picture 2"]
    encoded = []
    encode = model.text_encoder.encode
    monkeypatch.setattr(model.text_encoder, "encode", lambda p: encoded.append(list(p)) or encode(p))
    weights = torch.randn(len(prompts), 1, 1)

    def context_and_grads(context):
        model.zero_grad()
        (context * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.text_encoder.named_parameters() if p.grad is not None}
        assert grads
        return context.detach(), grads

    once, once_grads = context_and_grads(model.encode_text(prompts))
    assert encoded == [["image 1", "picture 2", ""]]
    rows, rows_grads = context_and_grads(model._encode_text_rows(prompts))  # every row encoded on its own
    torch.testing.assert_close(once, rows)
    assert once_grads.keys() == rows_grads.keys()
    for name, grad in once_grads.items():
        torch.testing.assert_close(grad, rows_grads[name], msg=lambda m: f"{name}: {m}")

    # An encoder that draws dropout masks while training gets every row, so that each row draws its own mask.
    attention = [m for m in model.text_encoder.modules() if isinstance(getattr(m, "dropout", None), float)]
    assert attention
    monkeypatch.setattr(model.text_encoder.model.config, "attention_dropout", 0.5)
    for m in attention:
        monkeypatch.setattr(m, "dropout", 0.5)
    encoded.clear()
    model.encode_text(prompts)
    assert encoded == [prompts]
    model.eval()  # no dropout when not training: encoded once again
    encoded.clear()
    model.encode_text(prompts)
    assert encoded == [["image 1", "picture 2", ""]]

    off = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, encode_repeated_captions_once=False))
    monkeypatch.setattr(off.text_encoder, "encode", lambda p: encoded.append(list(p)) or encode(p))
    encoded.clear()
    off.encode_text(prompts)
    assert encoded == [prompts]


def test_latent_cache_is_reused_and_invalidated(tmp_path, ldm_assets, caplog):
    cache = tmp_path / "cache"
    kwargs = tiny_ldm_kwargs(ldm_assets, cache_dir=str(cache), train_text_encoder=False)

    def fit() -> tuple[LatentDiffusion, ImageCaptionDataModule]:
        model = LatentDiffusion(**kwargs)
        dm = _dm(ldm_assets)
        _trainer(tmp_path, limit_train_batches=1, limit_val_batches=0).fit(model, datamodule=dm)
        return model, dm

    with caplog.at_level(logging.INFO, logger="ldm.data.cache_shards"):
        model, dm = fit()
    latent_dirs = sorted(cache.glob("latents-*"))
    assert len(latent_dirs) == 1 and len(list(cache.glob("text-*"))) == 1
    shard = next(latent_dirs[0].glob("shard-*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    # The DataModule owns the cache: its datasets are untouched, it serves the cache beside them.
    assert isinstance(dm.train_dataset, ImageCaptionDataset) and dm.cached_train_dataset.dataset is dm.train_dataset
    # The cached moments are the frozen VAE's posterior of each training image.
    with torch.no_grad():
        expected = model.autoencoder.encode(dm.train_dataset.image(0)[None]).moments[0]
    assert torch.allclose(dm.cached_train_dataset.moments(0), expected, atol=1e-5)
    # The frozen text encoder's outputs are cached too: batches carry them as context, used in place of the encoder
    # (a dropped caption gets the cached empty prompt's).
    batch = next(iter(dm.train_dataloader()))
    assert "image" not in batch and batch["moments"].shape[1:] == expected.shape
    with torch.no_grad():
        live = model.text_encoder.encode(batch["text"])
        empty = model.text_encoder.encode([""])[0]
    assert torch.allclose(batch["context"], live, atol=1e-6) and torch.allclose(dm.empty_context, empty, atol=1e-6)
    model.text_encoder.encode = lambda prompts: pytest.fail(f"the text encoder ran on {prompts}")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.context_from_batch(batch, g, dropout=0.0), batch["context"])
    assert torch.equal(model.context_from_batch(batch, g, dropout=1.0), dm.empty_context.expand_as(batch["context"]))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldm.data.cache_shards"):
        fit()
    assert "reusing the cache" in caplog.text
    assert sorted(cache.glob("latents-*")) == latent_dirs and shard.stat().st_mtime_ns == mtime

    # Editing an image changes the key: a new cache is built, the old one is left alone.
    train_image = ldm_assets["data"] / dm.train_dataset.records[0].path
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(train_image)
    fit()
    assert len(list(cache.glob("latents-*"))) == 2


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, ldm_assets):
    # 16 training images / batch 4 = 4 batches per epoch (val_fraction 0.25 of 24 -> about 18 train; limit to 4).
    def run(name: str, max_steps: int, ckpt_path: str | None = None) -> LatentDiffusion:
        pl.seed_everything(0)
        model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=4)
        trainer = _trainer(tmp_path, max_steps=max_steps, max_epochs=-1, limit_train_batches=4, limit_val_batches=0,
                           enable_checkpointing=True, callbacks=[pl.callbacks.EMAWeightAveraging(decay=0.9), ckpt])
        trainer.fit(model, datamodule=_dm(ldm_assets), ckpt_path=ckpt_path)
        assert trainer.global_step == max_steps
        return model

    straight = run("straight", 20)
    run("resumed", 12)
    resumed = run("resumed", 20, str(tmp_path / "resumed" / "last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bf16_mixed_precision_fit(tmp_path, ldm_assets):
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))
    trainer = _trainer(tmp_path, precision="bf16-mixed", limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=_dm(ldm_assets))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    images = model.generate(["image 1"], steps=2, guidance=2.0)
    assert images.dtype == torch.float32 and images.shape == (1, 3, 32, 32)


def test_constructor_rejects_bad_arguments(ldm_assets):
    with pytest.raises(ValueError, match="tokenizer"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, tokenizer=None))
    with pytest.raises(ValueError, match="loss_weighting"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, objective={"loss_weighting": "p2"}))
    with pytest.raises(ValueError, match="prediction"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, prediction_type="x0"))
    with pytest.raises(ValueError, match="validation.sampler='plms'; choose one of ddpm, ddim, dpmpp_2m"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, validation={"sampler": "plms"}))
