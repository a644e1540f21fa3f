"""LoRA files in kohya's layout: written and read back (per-layer ranks and alphas, conv layers), converted both ways
with diffusers' layout, and read by diffusers' own kohya converter with the same numerics (the layout is the real one)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_lora import INPUTS, TINY, base_unet, clip_out, diffusers_pair, randomize_lora_, run, tiny_clip

from ldm.formats.kohya_lora import save_kohya_lora
from ldm.formats.lora_files import load_lora, save_lora
from ldm.nn.lora import TEXT_ENCODER_TARGETS, add_lora, lora_layers


def _keys(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_unet_round_trip_keeps_per_layer_ranks_alphas_and_conv_layers(tmp_path):
    unet = base_unet()
    conv = "input_blocks.1.0.in_layers.2"  # a 3x3 resnet convolution ("LoCon")
    assert isinstance(unet.get_submodule(conv), torch.nn.Conv2d)
    odd = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    add_lora(unet, rank=4, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", conv],
             rank_pattern={odd: 2}, alpha_pattern={odd: 8.0})
    randomize_lora_(unet)
    path = save_kohya_lora(tmp_path / "k.safetensors", unet=unet)
    keys = _keys(path)
    prefix = "lora_unet_down_blocks_0_"
    assert keys[f"{prefix}attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 8.0
    assert keys[f"{prefix}attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 2
    assert keys[f"{prefix}attentions_0_transformer_blocks_0_attn1_to_k.alpha"].item() == 2.0
    assert keys[f"{prefix}resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert keys[f"{prefix}resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert len(keys) == 3 * len(lora_layers(unet)) and all(k.startswith("lora_unet_") for k in keys)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ss_network_dim"] == "mixed"

    fresh = base_unet()
    base = run(fresh)
    load_lora(fresh, path)
    torch.testing.assert_close(run(fresh), run(unet), atol=1e-5, rtol=1e-5)
    assert (run(fresh) - base).abs().max() > 1e-2
    layer = lora_layers(fresh)[odd]
    assert layer.r["default"] == 2 and layer.scaling["default"] == 4.0  # alpha 8 / rank 2
    load_lora(fresh, path, scale=0.0)  # onto the adapters it has: replaced, scale applied
    torch.testing.assert_close(run(fresh), base, atol=1e-6, rtol=0)


def test_text_encoder_and_both_layouts_convert_both_ways(tmp_path):
    from types import SimpleNamespace

    from ldm.nn.text_encoder import TextEncoder

    def pipe():
        return SimpleNamespace(unet=base_unet(), text_encoder=TextEncoder(tiny_clip(), tokenizer=None, max_length=8).eval())

    trained = pipe()
    randomize_lora_(add_lora(trained.unet, rank=4, alpha=2))
    randomize_lora_(add_lora(trained.text_encoder.model, rank=2, alpha=4, target_modules=TEXT_ENCODER_TARGETS), seed=3)
    diffusers_file = save_lora(tmp_path / "d.safetensors", unet=trained.unet, text_encoder=trained.text_encoder.model)

    via = pipe()
    load_lora(via, diffusers_file)  # diffusers layout -> ours -> kohya layout
    kohya_file = save_kohya_lora(tmp_path / "k.safetensors", unet=via.unet, text_encoder=via.text_encoder)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in _keys(kohya_file)
    back = pipe()
    load_lora(back, kohya_file)  # kohya layout -> ours -> diffusers layout again
    again = save_lora(tmp_path / "d2.safetensors", unet=back.unet, text_encoder=back.text_encoder)
    first, second = _keys(diffusers_file), _keys(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    torch.testing.assert_close(run(back.unet), run(trained.unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_out(back.text_encoder.model), clip_out(trained.text_encoder.model), atol=1e-6, rtol=0)


def test_diffusers_reads_our_kohya_file_with_the_same_numerics(tmp_path):
    lora_pipeline = pytest.importorskip("diffusers.loaders.lora_pipeline")
    reference, unet = diffusers_pair()
    base_theirs = run(unet)
    randomize_lora_(add_lora(unet, rank=4, alpha=2))  # alpha != rank: the .alpha tensors must carry the scale
    clip = randomize_lora_(add_lora(tiny_clip(), rank=2, alpha=4, target_modules=TEXT_ENCODER_TARGETS), seed=3)
    path = save_kohya_lora(tmp_path / "k.safetensors", unet=unet, text_encoder=clip)
    # What pipe.load_lora_weights(path) does: its kohya converter, then the UNet and text encoder loaders.
    state_dict, network_alphas = lora_pipeline.StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    assert network_alphas  # diffusers recognised the kohya layout and read its alphas
    lora_pipeline.StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, network_alphas, reference)
    x, t, ctx = INPUTS
    with torch.no_grad():
        theirs = reference(x, t, encoder_hidden_states=ctx).sample
    assert (run(unet) - base_theirs).abs().max() > 1e-2
    torch.testing.assert_close(theirs, run(unet), atol=1e-5, rtol=1e-5)
    text = tiny_clip()
    lora_pipeline.StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state_dict, network_alphas=network_alphas, text_encoder=text, prefix="text_encoder")
    torch.testing.assert_close(clip_out(text), clip_out(clip), atol=1e-5, rtol=1e-5)


def test_foreign_kohya_files_are_named(tmp_path):
    missing = tmp_path / "other_model.safetensors"
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(missing))
    with pytest.raises(ValueError, match="do not exist in this UNetModel.*down_blocks_7"):
        load_lora(base_unet(), missing)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 16)}, str(sdxl))
    with pytest.raises(ValueError, match="SDXL LoRA in kohya's layout"):
        load_lora(base_unet(), sdxl)
    unet = base_unet()
    before = run(unet)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32)}, str(half))
    with pytest.raises(ValueError, match="lacks its lora_down or lora_up"):
        load_lora(unet, half)
    assert not lora_layers(unet) and torch.equal(run(unet), before)  # all or nothing
    assert TINY["model_channels"] == 32  # the shapes above
