"""The shipped fine-tune configs run as written through `ldm fit`, with only sizes and paths overridden."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.cli import main
from ldm.pipeline import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_sd_file(tmp_path_factory):
    """A tiny model written as an SD single file (the stand-in for v1-5-pruned.safetensors)."""
    from conftest import save_tiny_base_model

    root = tmp_path_factory.mktemp("sd")
    assets, folder = save_tiny_base_model(root)
    return LatentDiffusionPipeline.from_pretrained(folder).save_pretrained(root / "tiny.safetensors", format="sd"), assets["data"]


@pytest.mark.parametrize("config, result", [("sd-lora.yaml", "checkpoints/sd-lora/pytorch_lora_weights.safetensors"),
                                            ("sd-full.yaml", "checkpoints/sd-finetune/model_index.json")])
def test_finetune_config_runs(tmp_path, monkeypatch, tiny_sd_file, config, result):
    sd_file, data = tiny_sd_file
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "finetune" / config), "--model.init_from", str(sd_file),
          "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
          "--data.val_fraction", "0.25", "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
          "--model.validation.steps", "2"])
    assert (tmp_path / result).is_file()
    (last,) = (tmp_path / "logs").rglob("last.ckpt")  # for --ckpt_path last
    if config == "sd-lora.yaml":
        state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
        assert state and all("lora_" in k or "." not in k for k in state)  # adapters only, no frozen base weights
    pipe = LatentDiffusionPipeline.from_pretrained(sd_file)
    if config == "sd-lora.yaml":
        pipe.load_lora(tmp_path / "checkpoints" / "sd-lora")
    else:
        pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "checkpoints" / "sd-finetune")
    images = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    if config == "sd-lora.yaml":
        # The CLI twins: generate with the adapter, and bake it into a plain SD file.
        main(["generate", "image 1", "--model", str(sd_file), "--lora", "checkpoints/sd-lora", "--seed", "0", "--steps", "2",
              "--out", "gen", "--device", "cpu"])
        assert len(list(Path("gen").glob("*.png"))) == 1
        main(["convert", str(sd_file), "merged.safetensors", "--to", "sd", "--lora", "checkpoints/sd-lora"])
        merged = LatentDiffusionPipeline.from_pretrained("merged.safetensors")
        assert not any("lora" in k for k in merged.unet.state_dict())
        again = merged("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False).images
        torch.testing.assert_close(again, images, atol=1e-4, rtol=0)


def test_lora_fit_exports_kohya_layout_when_asked(tmp_path, monkeypatch, tiny_sd_file):
    from safetensors import safe_open

    sd_file, data = tiny_sd_file
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "finetune" / "sd-lora.yaml"), "--model.init_from", str(sd_file),
          "--model.lora_format", "kohya", "--model.lora_text_encoder", "true", "--model.optimizer.learning_rate", "0.01",
          "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
          "--data.val_fraction", "0.25", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
          "--model.validation.steps", "2"])
    folder = tmp_path / "checkpoints" / "sd-lora"
    assert sorted(p.name for p in folder.iterdir()) == ["lora_info.json", "sd-lora.safetensors"]
    with safe_open(str(folder / "sd-lora.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert {k.split("_")[1] for k in keys} == {"unet", "te"} and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    pipe = LatentDiffusionPipeline.from_pretrained(sd_file)
    plain = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False).images
    pipe.load_lora(folder)  # the folder's only .safetensors file, kohya's layout
    tuned = pipe("image 1", num_inference_steps=2, seed=0, output_type="pt", progress=False).images
    assert (tuned - plain).abs().max() > 1e-4 and torch.isfinite(tuned).all()


def test_bad_lora_format_is_refused(tmp_path, monkeypatch, tiny_sd_file, capsys):
    sd_file, data = tiny_sd_file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs" / "finetune" / "sd-lora.yaml"), "--model.init_from", str(sd_file),
              "--model.lora_format", "a1111", "--data.root", str(data), "--trainer.max_steps", "1"])
    assert stop.value.code == 2 and "lora_format" in capsys.readouterr().err
