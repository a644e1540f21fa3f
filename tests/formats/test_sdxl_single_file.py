"""SDXL original single files (Stability's SGM layout) both ways: a tiny SDXL diffusers folder written as a single
file reads back identical and generates the same; diffusers' own single-file converters read that file as the folder
we started from; the full-size SDXL key set on the meta device maps onto our modules and diffusers' and gives
``SDXL_BASE_UNET``; foreign files (no ldm header, ``.ckpt``) need a tokenizer folder; incomplete files and missing
tokenizers are clear errors; ``ldm convert`` round-trips SDXL through every format."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from interop_helpers import SD_VAE_DIFFUSERS, SDXL_DIFFUSERS
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.formats.sd_checkpoint import load_sd_checkpoint, split_sd_state_dict
from ldm.formats.sdxl_single_file import (TOKENIZER_2_KEY, is_sdxl_checkpoint, read_sdxl_single_file,
                                          sdxl_checkpoint_state, sdxl_text_states, sdxl_unet_config_from_state)
from ldm.formats.vae_keys import vae_config_from_diffusers, vae_config_from_state_dict
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import SDXL_BASE_UNET, UNetConfig
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.unet import UNetModel
from ldm.pipeline import LatentDiffusionPipeline

from test_sdxl_generation_parity import NEGATIVES, PROMPTS, _build, _ours_generate

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")  # a CLIPTextModel: no projection
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _modules(pipe):
    first, second = pipe.text_encoder.encoders
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": first.model, "text_encoder_2": second.model}


def _assert_same_weights(a, b):
    for name, module in _modules(a).items():
        sa, sb = module.state_dict(), _modules(b)[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def _foreign(path, out, extra=None):
    """``path``'s tensors as another tool writes them: no ldm header (a .ckpt here, read with weights_only=True)."""
    state = {**load_file(str(path)), **(extra or {})}
    torch.save({"state_dict": state, "global_step": 3}, out)
    return out


def test_sdxl_folder_to_single_file_and_back_is_identical_and_generates_the_same(diffusers, tmp_path):
    _, ours = _build(diffusers, tmp_path)
    path = ours.save_pretrained(tmp_path / "xl.safetensors", format="sd")
    parts = load_sd_checkpoint(path)
    assert is_sdxl_checkpoint(parts) and not parts["text_encoder"]  # no cond_stage_model.*
    assert "conditioner.embedders.1.model.text_projection" in parts["other"]
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in parts["other"]

    back = LatentDiffusionPipeline.from_pretrained(path)  # configs and both tokenizers come from the header
    _assert_same_weights(ours, back)
    assert isinstance(back.text_encoder, DualTextEncoder) and back.unet_config == ours.unet_config
    assert [e.layer for e in back.text_encoder.encoders] == ["penultimate_raw"] * 2
    assert (back.scaling_factor, back.sample_size, back.sampler_config, back.force_zeros_for_empty_prompt) == \
        (ours.scaling_factor, ours.sample_size, ours.sampler_config, True)
    assert back.schedule.to_config() == ours.schedule.to_config() and back.prediction_type == ours.prediction_type
    for mine, theirs in zip(ours.text_encoder.tokenize(PROMPTS), back.text_encoder.tokenize(PROMPTS)):
        assert torch.equal(mine, theirs)
    kwargs = dict(negative_prompt=NEGATIVES, original_size=(64, 48))
    expected, expected_latents = _ours_generate(ours, **kwargs)
    images, latents = _ours_generate(back, **kwargs)
    torch.testing.assert_close(latents, expected_latents, rtol=0, atol=0)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)

    # force_zeros_for_empty_prompt=False survives the trip too.
    ours.force_zeros_for_empty_prompt = False
    again = ours.save_pretrained(tmp_path / "no-zeros.safetensors", format="sd")
    assert LatentDiffusionPipeline.from_pretrained(again).force_zeros_for_empty_prompt is False


def test_diffusers_own_single_file_converters_read_our_file_as_the_folder_we_started_from(diffusers, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    reference, ours = _build(diffusers, tmp_path)
    checkpoint = load_file(str(ours.save_pretrained(tmp_path / "xl.safetensors", format="sd")))
    # (infer_diffusers_model_type looks for bigG's 10th layer, which 2 layers lack: see the full-size test.)

    def same(converted, model, strip=""):
        expected = {k.removeprefix(strip): v for k, v in model.state_dict().items()}
        converted = {k.removeprefix(strip): v for k, v in converted.items()}
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)

    same(convert_ldm_unet_checkpoint(checkpoint, dict(reference.unet.config)), reference.unet)
    same(convert_ldm_vae_checkpoint(checkpoint, dict(reference.vae.config)), reference.vae)
    same(convert_ldm_clip_checkpoint(checkpoint), reference.text_encoder, strip="text_model.")
    bigg = convert_open_clip_checkpoint(reference.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model.")
    same(bigg, reference.text_encoder_2)
    # The projection is stored as OpenCLIP's (width, projection) matrix: the Linear's weight transposed.
    assert torch.equal(checkpoint["conditioner.embedders.1.model.text_projection"],
                       reference.text_encoder_2.text_projection.weight.T)


def test_full_size_sdxl_key_set_maps_both_ways_and_infers_the_base_config(diffusers):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)

    vae_config = vae_config_from_diffusers(SD_VAE_DIFFUSERS)
    with torch.device("meta"):
        unet, vae = UNetModel(**SDXL_BASE_UNET), KLAutoencoder(**vae_config)
        clip_l, big_g = CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G))
        reference_unet = diffusers.UNet2DConditionModel(**SDXL_DIFFUSERS).state_dict()
    state = sdxl_checkpoint_state(unet.state_dict(), vae.state_dict(), clip_l.state_dict(), big_g.state_dict())
    shapes = {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
              "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
              "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
              "conditioner.embedders.1.model.text_projection": (1280, 1280),
              "conditioner.embedders.1.model.positional_embedding": (77, 1280),
              "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert infer_diffusers_model_type(state) == "xl_base"

    parts = split_sd_state_dict(state)
    assert is_sdxl_checkpoint(parts) and not parts["text_encoder"]
    inferred = sdxl_unet_config_from_state(parts["unet"], pooled_size=1280)
    assert UNetConfig.from_dict(inferred) == UNetConfig(**SDXL_BASE_UNET)
    assert sdxl_unet_config_from_state(parts["unet"])["addition_time_embed_dim"] == 256  # SGM's, without the pooled width
    (first_state, first_config), (second_state, second_config) = sdxl_text_states(parts["other"])
    for config, expected in ((first_config, CLIP_L), (second_config, BIG_G)):
        assert {k: getattr(config, k) for k in expected} == expected
    with torch.device("meta"):
        built = {"unet": (UNetModel(**inferred), parts["unet"]),
                 "vae": (KLAutoencoder(**vae_config_from_state_dict(parts["vae"])), parts["vae"]),
                 "clip_l": (CLIPTextModel(first_config), first_state),
                 "big_g": (CLIPTextModelWithProjection(second_config), second_state)}
    for name, (module, weights) in built.items():
        expected = module.state_dict()
        assert weights.keys() == expected.keys(), name  # no missing or unexpected keys
        assert all(weights[k].shape == expected[k].shape for k in expected), name

    # diffusers' converters take the same key set to its full-size SDXL modules.
    converted = convert_ldm_unet_checkpoint(state, SDXL_DIFFUSERS)
    assert converted.keys() == reference_unet.keys() and all(converted[k].shape == reference_unet[k].shape for k in converted)
    clip_keys = {k.removeprefix("text_model.") for k in convert_ldm_clip_checkpoint(state)}
    assert clip_keys == set(clip_l.state_dict())
    bigg = convert_open_clip_checkpoint(big_g, state, prefix="conditioner.embedders.1.model.")
    assert {k: v.shape for k, v in bigg.items()} == {k: v.shape for k, v in big_g.state_dict().items()}


def test_foreign_sdxl_ckpt_reads_with_a_tokenizer_folder(diffusers, tmp_path):
    _, ours = _build(diffusers, tmp_path)
    path = ours.save_pretrained(tmp_path / "xl.safetensors", format="sd")
    foreign = _foreign(path, tmp_path / "xl.ckpt", extra={"v_pred": torch.tensor([])})
    # The tiny UNet's 8-channel heads are not SGM's 64: shapes cannot tell, so they are passed.
    parts = read_sdxl_single_file(foreign, tokenizer=tmp_path / "sdxl", num_head_channels=8)
    assert (parts.variant, parts.scaling_factor, parts.sample_size, parts.prediction_type) == ("xl", 0.13025, 1024, "v_prediction")
    assert parts.force_zeros_for_empty_prompt is True
    assert dataclasses.replace(parts.unet_config, norm_groups=8) == ours.unet_config  # GroupNorm groups: SD's 32 assumed
    assert parts.unet_config.addition_time_embed_dim == 8  # (64 - pooled 16) / 6
    assert [e.model.config.hidden_act for e in parts.text_encoder.encoders] == ["quick_gelu", "gelu"]
    _assert_same_weights(ours, LatentDiffusionPipeline.from_components(parts))
    for mine, theirs in zip(ours.text_encoder.tokenize(PROMPTS), parts.text_encoder.tokenize(PROMPTS)):
        assert torch.equal(mine, theirs)


def test_incomplete_sdxl_files_and_missing_tokenizers_are_clear_errors(diffusers, tmp_path, monkeypatch):
    _, ours = _build(diffusers, tmp_path)
    path = ours.save_pretrained(tmp_path / "xl.safetensors", format="sd")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    state = load_file(str(path))
    for dropped, named in (("conditioner.embedders.1.", "OpenCLIP bigG"), ("conditioner.embedders.0.", "CLIP ViT-L")):
        half = tmp_path / f"half-{named[:4]}.safetensors"
        save_file({k: v for k, v in state.items() if not k.startswith(dropped)}, str(half), metadata=header)
        with pytest.raises(ValueError, match=rf"{half.name} holds only SDXL's .*; {named} .* is missing.*diffusers copy"):
            LatentDiffusionPipeline.from_pretrained(half)
    bare = tmp_path / "unet-vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("conditioner.")}, str(bare), metadata=header)
    with pytest.raises(ValueError, match="unet-vae.safetensors has an SDXL UNet .* but no text encoders"):
        LatentDiffusionPipeline.from_pretrained(bare)
    refiner = tmp_path / "refiner.safetensors"
    save_file({k.replace("embedders.1.", "embedders.0."): v for k, v in state.items() if not k.startswith("conditioner.embedders.0.")},
              str(refiner))
    with pytest.raises(ValueError, match="refiner.safetensors looks like an SDXL refiner"):
        read_sdxl_single_file(refiner)

    foreign = _foreign(path, tmp_path / "foreign.ckpt")
    monkeypatch.setattr("ldm.formats.sdxl_single_file.DEFAULT_SDXL_TOKENIZERS", "./no/such/sdxl")
    with pytest.raises(OSError, match=r"foreign.ckpt is an SDXL single file and holds no tokenizers.*tokenizer_2/"):
        LatentDiffusionPipeline.from_pretrained(foreign, num_head_channels=8)
    only_one = tmp_path / "one-tokenizer"
    ours.text_encoder.first.save_pretrained(only_one)  # tokenizer/ without tokenizer_2/
    with pytest.raises(OSError, match=r"has no tokenizer_2/.*--tokenizer"):
        LatentDiffusionPipeline.from_pretrained(foreign, tokenizer=only_one, num_head_channels=8)
    no_header_2 = tmp_path / "no-tokenizer-2.safetensors"
    save_file(state, str(no_header_2), metadata={k: v for k, v in header.items() if k != TOKENIZER_2_KEY})
    with pytest.raises(OSError, match="no-tokenizer-2.safetensors is an SDXL single file"):
        LatentDiffusionPipeline.from_pretrained(no_header_2)
    assert LatentDiffusionPipeline.from_pretrained(no_header_2, tokenizer=tmp_path / "sdxl").unet_config == ours.unet_config


def test_ldm_convert_round_trips_sdxl_through_every_format(diffusers, tmp_path):
    from ldm.cli import main

    _, ours = _build(diffusers, tmp_path)
    main(["convert", str(tmp_path / "sdxl"), str(tmp_path / "xl.safetensors"), "--to", "sd"])
    main(["convert", str(tmp_path / "xl.safetensors"), str(tmp_path / "as-ldm"), "--to", "ldm"])
    main(["convert", str(tmp_path / "as-ldm"), str(tmp_path / "as-diffusers"), "--to", "diffusers"])
    main(["convert", str(tmp_path / "as-diffusers"), str(tmp_path / "again.safetensors"), "--to", "sd"])
    index = json.loads((tmp_path / "as-ldm" / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True and index["text_encoder_2"] == "text_encoder_2"
    latents = _ours_generate(ours, "latent")[1]
    for converted in ("xl.safetensors", "as-ldm", "as-diffusers", "again.safetensors"):
        back = LatentDiffusionPipeline.from_pretrained(tmp_path / converted)
        _assert_same_weights(ours, back)
        assert back.force_zeros_for_empty_prompt is True and back.unet_config == ours.unet_config, converted
        torch.testing.assert_close(_ours_generate(back, "latent")[1], latents, rtol=0, atol=0)
    # What we wrote is an SDXL folder diffusers loads.
    assert type(diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "as-diffusers")).__name__ == "StableDiffusionXLPipeline"
