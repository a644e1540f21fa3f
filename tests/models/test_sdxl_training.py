"""Training SDXL-shaped models (a tiny random-weight SDXL diffusers folder): the shipped sdxl-lora / sdxl-full configs
run through ``ldm fit``, their exports load in our pipeline (and the full one in diffusers' SDXL pipeline), and the
training conditioning is SDXL's: both encoders' tokens + pooled embedding, zeroed by caption dropout, and the size/crop
micro-conditioning recorded per sample."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ldm.cli import main
from ldm.pipeline import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "formats"))


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL diffusers folder (random weights; f=4 VAE) and a captioned image folder."""
    diffusers = pytest.importorskip("diffusers")
    from conftest import write_tiny_dataset
    from test_sdxl_generation_parity import _build

    root = tmp_path_factory.mktemp("sdxl")
    _build(diffusers, root)
    return root / "sdxl", write_tiny_dataset(root / "data", n=12)


def _fit(config: str, model: Path, data: Path, *extra: str) -> None:
    main(["fit", "--config", str(ROOT / "configs" / "finetune" / config), "--model.init_from", str(model),
          "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
          "--data.val_fraction", "0.25", "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--model.validation.steps", "2", *extra])


def test_sdxl_lora_config_trains_caches_both_embeddings_and_exports_an_adapter(tmp_path, monkeypatch, tiny_sdxl):
    model, data = tiny_sdxl
    monkeypatch.chdir(tmp_path)
    _fit("sdxl-lora.yaml", model, data, "--model.optimizer.learning_rate", "0.01")
    folder = tmp_path / "checkpoints" / "sdxl-lora"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "data" / "cache" / "sdxl-lora").glob("text-*"))  # context + pooled cached
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    plain = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False, height=32, width=32).images
    pipe.load_lora(folder)
    tuned = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False, height=32, width=32).images
    assert torch.isfinite(tuned).all() and (tuned - plain).abs().max() > 1e-5


def test_sdxl_full_config_exports_a_folder_diffusers_loads(tmp_path, monkeypatch, tiny_sdxl):
    diffusers = pytest.importorskip("diffusers")
    model, data = tiny_sdxl
    monkeypatch.chdir(tmp_path)
    _fit("sdxl-full.yaml", model, data, "--model.optimizer.learning_rate", "0.001")
    out = tmp_path / "checkpoints" / "sdxl-finetune"
    ours = LatentDiffusionPipeline.from_pretrained(out)
    base = LatentDiffusionPipeline.from_pretrained(model)
    changed = [k for k, v in ours.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed and any(k.startswith("label_emb") for k in changed)  # the vector conditioning trains too
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
    assert reference.unet.config.addition_embed_type == "text_time"
    images = ours("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False, height=32, width=32).images
    assert torch.isfinite(images).all()


def test_sdxl_training_conditioning_uses_sizes_and_zeroes_dropped_captions(tiny_sdxl):
    from ldm.models import LatentDiffusion
    from ldm.models.sdxl_training import sdxl_training_conditioning

    model_path, _ = tiny_sdxl
    model = LatentDiffusion(init_from=str(model_path))
    assert model.is_sdxl and not model.text_encoder.trainable
    batch = {"text": ["image 1", "image 2"], "size_conditioning": torch.tensor([[64.0, 48.0, 8.0, 0.0], [32.0, 32.0, 0.0, 0.0]])}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    context, y = sdxl_training_conditioning(model, batch, g(), 0.0, (32, 32))
    encoded, pooled = model.encode_text(batch["text"])
    torch.testing.assert_close(context, encoded)
    torch.testing.assert_close(y[:, :16], pooled)
    other = {**batch, "size_conditioning": batch["size_conditioning"].flip(0)}
    assert (sdxl_training_conditioning(model, other, g(), 0.0, (32, 32))[1] - y).abs().max() > 0.1
    dropped_context, dropped_y = sdxl_training_conditioning(model, batch, g(), 1.0, (32, 32))
    assert dropped_context.abs().max() == 0 and dropped_y[:, :16].abs().max() == 0  # both encoders' embeddings
    torch.testing.assert_close(dropped_y[:, 16:], y[:, 16:])  # the size ids stay


def test_sdxl_lora_with_both_text_encoders_exports_kohya_layout(tmp_path, monkeypatch, tiny_sdxl):
    from safetensors import safe_open

    model, data = tiny_sdxl
    monkeypatch.chdir(tmp_path)
    _fit("sdxl-lora.yaml", model, data, "--model.optimizer.learning_rate", "0.01", "--model.lora_format", "kohya",
         "--model.lora_text_encoder", "true")
    folder = tmp_path / "checkpoints" / "sdxl-lora"
    with safe_open(str(folder / "sdxl-lora.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SGM module paths
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    plain = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False, height=32, width=32).images
    pipe.load_lora(folder)
    tuned = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False, height=32, width=32).images
    assert torch.isfinite(tuned).all() and (tuned - plain).abs().max() > 1e-5


def test_a_text_encoder_layer_for_an_sdxl_model_is_refused(tiny_sdxl):
    from ldm.models import LatentDiffusion

    model_path, _ = tiny_sdxl
    with pytest.raises(ValueError, match="SDXL model.*leave text_encoder_layer out"):
        LatentDiffusion(init_from=str(model_path), text_encoder_layer="last")
