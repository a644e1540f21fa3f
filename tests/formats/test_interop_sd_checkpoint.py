"""Original SD single files: split, EMA, variant detection, writing and reading back."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import randomize_, tiny_clip_config
from transformers import CLIPTextModel

from ldm.formats.clip_keys import sd_v1_clip_to_transformers
from ldm.formats.sd_checkpoint import detect_sd_variant, load_sd_checkpoint, save_sd_checkpoint
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.unet import UNetModel

TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=8, context_dim=16)
TINY_VAE = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)


def meta_unet_state(**config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return UNetModel(**config).state_dict()


@pytest.fixture(scope="module")
def tiny_parts():
    unet = randomize_(UNetModel(**TINY_UNET), seed=1).state_dict()
    vae = randomize_(KLAutoencoder(**TINY_VAE), seed=2).state_dict()
    clip = randomize_(CLIPTextModel(tiny_clip_config()), seed=3).state_dict()
    return unet, vae, clip


def test_save_then_load_is_bit_identical(tmp_path, tiny_parts):
    unet, vae, clip = tiny_parts
    path = save_sd_checkpoint(tmp_path / "model.safetensors", unet, vae, clip)
    parts = load_sd_checkpoint(path)
    assert parts["ema_used"] == 0 and not parts["other"]
    for ours, loaded in ((unet, parts["unet"]), (vae, parts["vae"]), (clip, sd_v1_clip_to_transformers(parts["text_encoder"]))):
        assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)
    variant = detect_sd_variant(parts["unet"])
    assert variant["unet_config"] == dict(
        TINY_UNET, in_channels=4, out_channels=4, num_head_channels=-1, transformer_depth=1, use_linear_in_transformer=False
    )
    UNetModel(**variant["unet_config"]).load_state_dict(parts["unet"], strict=True)


def test_ema_weights_are_used_when_asked(tmp_path, tiny_parts):
    unet, vae, clip = tiny_parts
    state = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    ema = {k: v + 1.0 for k, v in unet.items()}
    state.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.items()})
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10)
    assert "model_ema.diffusion_modelinput_blocks00weight" in state
    path = tmp_path / "v1.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)

    with_ema = load_sd_checkpoint(path, use_ema=True)
    assert with_ema["ema_used"] == len(unet)
    assert all(torch.equal(with_ema["unet"][k], ema[k]) for k in unet)
    plain = load_sd_checkpoint(path, use_ema=False)
    assert plain["ema_used"] == 0 and all(torch.equal(plain["unet"][k], unet[k]) for k in unet)
    assert all(torch.equal(plain["vae"][k], vae[k]) for k in vae)


def test_detect_variants_from_shapes():
    v1 = detect_sd_variant({f"model.diffusion_model.{k}": v for k, v in meta_unet_state(**dict(TINY_UNET, context_dim=768)).items()})
    assert (v1["version"], v1["inpainting"], v1["context_dim"]) == ("v1", False, 768)
    assert v1["unet_config"]["num_heads"] == 8 and not v1["unet_config"]["use_linear_in_transformer"]

    v2_config = dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1, 2), num_head_channels=64,
                     context_dim=1024, use_linear_in_transformer=True, transformer_depth=2)  # fmt: skip
    v2 = detect_sd_variant(meta_unet_state(**v2_config))
    assert (v2["version"], v2["inpainting"], v2["context_dim"]) == ("v2", False, 1024)
    assert {k: v2["unet_config"][k] for k in v2_config} == v2_config

    inpaint = detect_sd_variant(meta_unet_state(**dict(TINY_UNET, in_channels=9, context_dim=768)))
    assert inpaint["inpainting"] and inpaint["version"] == "v1" and inpaint["unet_config"]["in_channels"] == 9


def test_unknown_layout_error_lists_keys():
    diffusers_like = {"down_blocks.0.resnets.0.norm1.weight": torch.zeros(4), "conv_in.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(ValueError, match=r"missing keys \['time_embed.0.weight'.*unexpected keys .*down_blocks.0.resnets.0.norm1.weight"):
        detect_sd_variant(diffusers_like)
    broken = meta_unet_state(**TINY_UNET)
    broken.pop("output_blocks.1.0.in_layers.2.weight")
    with pytest.raises(ValueError, match=r"output_blocks.1.0.in_layers.2.weight"):
        detect_sd_variant(broken)


def test_bad_paths_and_extensions(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_sd_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=".onnx"):
        load_sd_checkpoint(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match=".safetensors only"):
        save_sd_checkpoint(tmp_path / "out.ckpt", {}, {})
