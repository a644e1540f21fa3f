"""The pipeline's formats and adapters: diffusers folders both ways, SD single-file export, `ldm convert`, LoRA."""

import pytest
import torch

from ldm.cli import main
from ldm.formats import load_sd_checkpoint
from ldm.formats.lora_files import save_lora
from ldm.nn.lora import add_lora
from ldm.pipeline import LatentDiffusionPipeline

from test_pipeline import pipe  # noqa: F401  (the tiny pipeline fixture)

KW = dict(num_inference_steps=3, guidance_scale=3.0, seed=4, progress=False, output_type="pt")


def test_diffusers_folder_round_trip_and_diffusers_loads_it(pipe, tmp_path):  # noqa: F811
    diffusers = pytest.importorskip("diffusers")
    folder = pipe.save_pretrained(tmp_path / "sd-diffusers", format="diffusers")
    back = LatentDiffusionPipeline.from_pretrained(folder)
    for a, b in zip(pipe.unet.state_dict().values(), back.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.allclose(pipe("a blue square", **KW).images, back("a blue square", **KW).images, atol=1e-5)
    assert back.scaling_factor == pytest.approx(pipe.scaling_factor) and back.sample_size == pipe.sample_size

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx = pipe.text_encoder.encode(["a blue square", "a red circle 1"])
    with torch.no_grad():
        assert torch.allclose(ref.unet(x, t, ctx).sample, pipe.unet(x, t, ctx), atol=1e-5)


def test_sd_single_file_export_holds_our_weights(pipe, tmp_path):  # noqa: F811
    path = pipe.save_pretrained(tmp_path / "model.safetensors", format="sd")
    parts = load_sd_checkpoint(path)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(parts["unet"][k], v), k
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(parts["vae"][k], v), k
    with pytest.raises(ValueError, match="safetensors"):
        pipe.save_pretrained(tmp_path / "model.ckpt", format="sd")


def test_convert_command(pipe, tmp_path, capsys):  # noqa: F811
    pipe.save_pretrained(tmp_path / "ours")
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "as-diffusers"), "--to", "diffusers"])
    main(["convert", str(tmp_path / "as-diffusers"), str(tmp_path / "back"), "--to", "ldm"])
    assert "Wrote" in capsys.readouterr().out
    back = LatentDiffusionPipeline.from_pretrained(tmp_path / "back")
    assert torch.allclose(pipe("a red circle 1", **KW).images, back("a red circle 1", **KW).images, atol=1e-5)


def test_load_lora_scale_and_merge(pipe, tmp_path):  # noqa: F811
    trained = LatentDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "base"))
    add_lora(trained.unet, rank=2)
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # stands in for training
    adapter = save_lora(tmp_path / "adapter.safetensors", unet=trained.unet)

    target = LatentDiffusionPipeline.from_pretrained(tmp_path / "base")
    base = target("a blue square", **KW).images
    target.load_lora(adapter, scale=1.0)
    with_lora = target("a blue square", **KW).images
    assert not torch.allclose(base, with_lora, atol=1e-3)
    assert torch.allclose(with_lora, trained("a blue square", **KW).images, atol=1e-5)
    target.set_lora_scale(0.0)
    assert torch.allclose(target("a blue square", **KW).images, base, atol=1e-5)
    target.set_lora_scale(1.0)
    target.merge_lora()
    assert torch.allclose(target("a blue square", **KW).images, with_lora, atol=1e-4)


def test_diffusers_folder_scheduler_settings_are_followed_or_named(pipe, tmp_path):  # noqa: F811
    import json

    folder = pipe.save_pretrained(tmp_path / "sd-diffusers", format="diffusers")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert config["clip_sample"] is False and config["set_alpha_to_one"] is pipe.sampler_config.set_alpha_to_one
    config.update(final_sigmas_type="sigma_min", timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    back = LatentDiffusionPipeline.from_pretrained(folder)
    assert (back.sampler_config.final_sigmas_type, back.sampler_config.timestep_spacing) == ("sigma_min", "trailing")
    config["timestep_spacing"] = "uniform"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="scheduler_config.json.*timestep_spacing"):
        LatentDiffusionPipeline.from_pretrained(folder)
