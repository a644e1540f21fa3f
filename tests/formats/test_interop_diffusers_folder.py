"""diffusers folders: what we write loads in diffusers' StableDiffusionPipeline, and reads back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import randomize_, tiny_clip_config
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.data.tokenizer import train_clip_tokenizer
from ldm.formats.diffusers_folder import read_diffusers_folder, read_diffusers_states, read_vae_scaling_factor, write_diffusers_folder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.unet import UNetModel

UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_head_channels=16,
            context_dim=16, use_linear_in_transformer=True)  # fmt: skip
VAE = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=16)
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    unet = randomize_(UNetModel(**UNET), seed=1).eval()
    vae = randomize_(KLAutoencoder(**VAE), seed=2).eval()
    tok_dir = tmp_path_factory.mktemp("tok")
    tokenizer = CLIPTokenizer.from_pretrained(train_clip_tokenizer(["a red circle", "a blue square"] * 3, tok_dir, vocab_size=520))
    n = len(tokenizer)
    text_encoder = randomize_(CLIPTextModel(tiny_clip_config(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)))
    return unet, vae, text_encoder.eval(), tokenizer


def test_dpm_solver_scheduler_folder_loads_in_diffusers(tmp_path, diffusers, tiny_models):
    unet, vae, text_encoder, tokenizer = tiny_models
    folder = write_diffusers_folder(
        tmp_path / "pipe", unet.state_dict(), UNET, vae.state_dict(), VAE, text_encoder, tokenizer, SCHEDULE,
        scheduler_class="DPMSolverMultistepScheduler",
    )  # fmt: skip
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.prediction_type == "epsilon"
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]


def test_written_folder_loads_in_diffusers_and_reads_back(tmp_path, diffusers, tiny_models):
    scheduler_class = "DDIMScheduler"
    unet, vae, text_encoder, tokenizer = tiny_models
    folder = write_diffusers_folder(
        tmp_path / "pipe", unet.state_dict(), UNET, vae.state_dict(), VAE, text_encoder, tokenizer, SCHEDULE,
        scheduler_class=scheduler_class, prediction_type="v_prediction",
    )  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == scheduler_class
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.safety_checker is None
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 7, 16)
    with torch.no_grad():
        expected = unet(x, t, context)
        got = pipe.unet.eval()(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(pipe.vae.eval().decode(z).sample, vae.decode(z), atol=1e-5, rtol=1e-5)
        ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(pipe.text_encoder(ids)[0], text_encoder(ids)[0])

    unet_sd, unet_config, vae_sd, vae_config, te_path, tok_path, scheduler = read_diffusers_states(folder)
    assert unet_config == {**UNET, "in_channels": 4, "out_channels": 4, "num_heads": -1, "transformer_depth": 1, "norm_groups": 32}
    assert all(torch.equal(unet_sd[k], v) for k, v in unet.state_dict().items()) and unet_sd.keys() == unet.state_dict().keys()
    assert all(torch.equal(vae_sd[k], v) for k, v in vae.state_dict().items()) and vae_sd.keys() == vae.state_dict().keys()
    KLAutoencoder(**vae_config).load_state_dict(vae_sd, strict=True)
    assert te_path == folder / "text_encoder" and tok_path == folder / "tokenizer"
    assert scheduler["_class_name"] == scheduler_class and read_vae_scaling_factor(folder) == 0.18215
    # The reader builds the whole model from it: the same weights, the folder's prediction type and scaling factor.
    parts = read_diffusers_folder(folder)
    assert parts.prediction_type == "v_prediction" and parts.scaling_factor == pytest.approx(0.18215)
    assert all(torch.equal(parts.unet.state_dict()[k], v) for k, v in unet.state_dict().items())
    assert all(torch.equal(parts.vae.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_diffusers_saved_folder_loads_into_ours(tmp_path, diffusers):
    from interop_helpers import TINY_V1, TINY_VAE_DIFFUSERS

    reference_unet = randomize_(diffusers.UNet2DConditionModel(**TINY_V1)).eval()
    reference_vae = randomize_(diffusers.AutoencoderKL(**TINY_VAE_DIFFUSERS)).eval()
    reference_unet.save_pretrained(tmp_path / "unet")
    reference_vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    unet_sd, unet_config, vae_sd, vae_config, te_path, _, scheduler = read_diffusers_states(tmp_path)
    assert te_path is None and scheduler is None
    unet = UNetModel(**unet_config).eval()
    unet.load_state_dict(unet_sd, strict=True)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([321]), torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context), reference_unet(x, t, encoder_hidden_states=context).sample, atol=1e-5, rtol=1e-5)


def test_missing_folder_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_diffusers_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        read_diffusers_folder(tmp_path)
