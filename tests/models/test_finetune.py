"""Fine-tuning: ``LatentDiffusion(init_from=...)`` from an SD single file, a diffusers folder or our export, full and
LoRA; slim checkpoints; the adapter file loads onto a base pipeline (ours and diffusers') and merges."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ldm.data import ImageCaptionDataModule
from ldm.models import LatentDiffusion, SavePretrained
from ldm.models.latent_diffusion_config import ObjectiveConfig, OptimizerConfig, ValidationConfig
from ldm.pipeline import LatentDiffusionPipeline

KW = dict(num_inference_steps=4, guidance_scale=3.0, seed=2, progress=False, output_type="pt")
NO_CAPTION_DROPOUT = ObjectiveConfig(cond_dropout=0.0)
NO_SAMPLES = ValidationConfig(prompts=[])
PROMPT = "picture 3"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model (random weights: its loss is high, so fine-tuning has something to learn) in three layouts."""
    from conftest import save_tiny_base_model

    root = tmp_path_factory.mktemp("base")
    assets, ours = save_tiny_base_model(root)
    pipe = LatentDiffusionPipeline.from_pretrained(ours)
    return {
        "assets": assets,
        "ours": ours,
        "sd": pipe.save_pretrained(root / "base.safetensors", format="sd"),
        "diffusers": pipe.save_pretrained(root / "diffusers", format="diffusers"),
    }


def _trainer(tmp_path: Path, steps: int, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kwargs})


def _dm(base) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(root=str(base["assets"]["data"]), batch_size=6, val_fraction=0.25)


def _fixed_loss(model: LatentDiffusion, base) -> float:
    """Mean training loss over the training images, with fixed noise, timesteps and captions (no dropout)."""
    dm = _dm(base)
    dm.setup("fit")
    images = torch.stack([dm.train_dataset[i]["image"] for i in range(len(dm.train_dataset))])
    texts = [f"image {i}" for i in range(len(images))]
    model.eval()
    with torch.no_grad():
        losses = [model.diffusion_loss({"image": images, "text": texts}, torch.Generator().manual_seed(s), 0.0) for s in range(8)]
    return float(torch.stack(losses).mean())


def _finetune(base, tmp_path, source: str, steps: int, **kwargs) -> tuple[LatentDiffusion, float, float]:
    pl.seed_everything(0)
    model = LatentDiffusion(init_from=str(base[source]), optimizer=OptimizerConfig(learning_rate=kwargs.pop("learning_rate", 3e-3)),
                            objective=NO_CAPTION_DROPOUT, validation=NO_SAMPLES, cache_dir=str(tmp_path / "cache"), **kwargs)
    before = _fixed_loss(model, base)
    trainer = _trainer(tmp_path, steps, callbacks=[SavePretrained(str(tmp_path / "out"))])
    trainer.fit(model, datamodule=_dm(base))
    assert trainer.global_step == steps
    return model, before, _fixed_loss(model, base)


def test_lora_finetune_from_sd_file_learns_saves_a_small_adapter_that_loads_and_merges(base, tmp_path):
    model, before, after = _finetune(base, tmp_path, "sd", steps=40, lora_rank=4, lora_alpha=4, learning_rate=2e-2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and n.startswith("unet.") for n in trainable)
    assert after < 0.92 * before, (before, after)  # deterministic measurement: same noise, timesteps, captions

    adapter = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    assert adapter.is_file() and (tmp_path / "out" / "lora_info.json").is_file()
    assert not (tmp_path / "out" / "unet").exists()  # only the adapter is written
    assert adapter.stat().st_size < 0.1 * Path(base["sd"]).stat().st_size

    pipe = LatentDiffusionPipeline.from_pretrained(base["sd"])
    plain = pipe(PROMPT, **KW).images
    pipe.load_lora(tmp_path / "out", scale=1.0)
    tuned = pipe(PROMPT, **KW).images
    assert (tuned - plain).abs().max() > 1e-2  # the adapter changes generations
    ids = torch.tensor([0])
    x, ctx = torch.randn(1, 4, 8, 8), pipe.text_encoder.encode([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, ids, ctx), model.unet(x, ids, ctx), atol=1e-5, rtol=1e-5)  # what was trained
    pipe.set_lora_scale(0.0)
    torch.testing.assert_close(pipe(PROMPT, **KW).images, plain, atol=1e-5, rtol=0)
    pipe.set_lora_scale(1.0)
    pipe.merge_lora()
    torch.testing.assert_close(pipe(PROMPT, **KW).images, tuned, atol=1e-4, rtol=0)  # merged == unmerged


def test_diffusers_loads_the_trained_adapter(base, tmp_path, diffusers):
    model, _, _ = _finetune(base, tmp_path, "diffusers", steps=3, lora_rank=2, lora_alpha=1, learning_rate=1e-2)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(base["diffusers"]), safety_checker=None, requires_safety_checker=False)
    reference.load_lora_weights(str(tmp_path / "out"))  # the folder: diffusers finds pytorch_lora_weights.safetensors
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    ctx = model.text_encoder.encode(["image 1", "picture 2"])
    with torch.no_grad():
        torch.testing.assert_close(reference.unet(x, t, encoder_hidden_states=ctx).sample, model.unet(x, t, ctx), atol=1e-5, rtol=1e-5)


def test_full_finetune_from_diffusers_folder_trains_the_unet_only(base, tmp_path):
    model, before, after = _finetune(base, tmp_path, "diffusers", steps=12)
    assert after < before
    start = LatentDiffusionPipeline.from_pretrained(base["diffusers"])
    for frozen, original in ((model.autoencoder, start.vae), (model.text_encoder.model, start.text_encoder.model)):
        assert all(torch.equal(a, b) for a, b in zip(frozen.state_dict().values(), original.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), start.unet.state_dict().values()))
    tuned = LatentDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), tuned.unet.state_dict().values()))
    assert tuned.sampler_config == start.sampler_config  # the base model's timestep layout and final step travel along


def test_lora_checkpoint_is_slim_and_resumes(base, tmp_path):
    pl.seed_everything(0)
    kwargs = dict(init_from=str(base["ours"]), lora_rank=2, optimizer=OptimizerConfig(learning_rate=1e-2), objective=NO_CAPTION_DROPOUT,
                  validation=NO_SAMPLES)
    model = LatentDiffusion(**kwargs)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 3, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(model, datamodule=_dm(base))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["ldm_frozen_keys_omitted"] > 0
    assert all("lora_" in k or "." not in k for k in saved["state_dict"]), sorted(saved["state_dict"])[:5]
    assert last.stat().st_size < 0.2 * Path(base["sd"]).stat().st_size

    # The pipeline reads the slim checkpoint (frozen weights from init_from) ...
    pipe = LatentDiffusionPipeline.from_pretrained(last)
    torch.testing.assert_close(pipe(PROMPT, **KW).images, LatentDiffusionPipeline.from_components(_components(model))(PROMPT, **KW).images)
    with pytest.raises(ValueError, match="merge_lora"):
        pipe.save_pretrained(tmp_path / "unmerged")
    from ldm.cli import main

    main(["convert", str(last), str(tmp_path / "merged.safetensors"), "--to", "sd"])  # adapters baked in
    merged = LatentDiffusionPipeline.from_pretrained(tmp_path / "merged.safetensors")
    torch.testing.assert_close(merged(PROMPT, **KW).images, pipe(PROMPT, **KW).images, atol=1e-4, rtol=0)
    # ... and training resumes from it.
    resumed = LatentDiffusion(**kwargs)
    trainer = _trainer(tmp_path, 5, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=_dm(base), ckpt_path=str(last))
    assert trainer.global_step == 5

    # A checkpoint missing trained (LoRA) weights is refused, naming them.
    del saved["state_dict"][next(k for k in saved["state_dict"] if "lora_" in k)]
    with pytest.raises(ValueError, match="missing trained weights"):
        LatentDiffusion(**kwargs).load_trained_state(saved["state_dict"], "broken.ckpt")


def _components(model: LatentDiffusion):
    from ldm.formats.components import ModelComponents

    return ModelComponents(model.unet.eval(), model.autoencoder, model.text_encoder, model.schedule, model.prediction_type,
                           float(model.scaling_factor), 32)


def test_frozen_half_precision_with_bf16_mixed(base, tmp_path):
    pl.seed_everything(0)
    model = LatentDiffusion(init_from=str(base["ours"]), lora_rank=2, frozen_dtype="bf16", gradient_checkpointing=True,
                            objective=NO_CAPTION_DROPOUT, validation=ValidationConfig(prompts=["image 1"], steps=2))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    trainer = _trainer(tmp_path, 2, precision="bf16-mixed", limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, datamodule=_dm(base))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_init_from_refuses_conflicting_arguments(base):
    with pytest.raises(ValueError, match="leave out \\['autoencoder'\\]"):
        LatentDiffusion(init_from=str(base["ours"]), autoencoder=str(base["assets"]["vae"]))
    with pytest.raises(ValueError, match="init_from"):
        LatentDiffusion()


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_on_feed_forward_and_text_encoder_mlp_layers_exports_and_loads(base, tmp_path, layout):
    """The demo recipe's wider adapters (UNet attention + feed-forward, CLIP attention + MLP) train, export in both
    layouts and load back onto a base pipeline as what was trained."""
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    model, _, _ = _finetune(base, tmp_path, "ours", steps=3, lora_rank=2, lora_alpha=2, learning_rate=1e-2, lora_targets=unet_targets,
                            lora_text_encoder=True, lora_text_encoder_targets=text_targets, lora_format=layout)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for part in ("ff.net.0.proj", "ff.net.2", "attn2.to_k"):
        assert any(f".{part}.lora_" in n and n.startswith("unet.") for n in trainable), part
    for part in ("mlp.fc1", "mlp.fc2", "self_attn.q_proj"):
        assert any(f".{part}.lora_" in n and n.startswith("text_encoder.") for n in trainable), part

    pipe = LatentDiffusionPipeline.from_pretrained(base["ours"])
    plain = pipe.text_encoder.encode([PROMPT])
    pipe.load_lora(tmp_path / "out", scale=1.0)
    ctx = pipe.text_encoder.encode([PROMPT])
    model.eval()
    with torch.no_grad():
        trained_ctx = model.text_encoder.encode([PROMPT])
        assert (trained_ctx - plain).abs().max() > 1e-4  # the text encoder's adapters changed it
        torch.testing.assert_close(ctx, trained_ctx, atol=1e-5, rtol=1e-5)
        x, ids = torch.randn(1, 4, 8, 8), torch.tensor([500])
        torch.testing.assert_close(pipe.unet(x, ids, ctx), model.unet(x, ids, ctx), atol=1e-5, rtol=1e-5)


def test_text_encoder_targets_that_match_no_layer_are_named(base):
    with pytest.raises(ValueError, match=r"no layer of .* matches target_modules=\['mlp_fc9'\]"):
        LatentDiffusion(init_from=str(base["ours"]), lora_rank=2, lora_text_encoder=True, lora_text_encoder_targets=["mlp_fc9"])
