"""SD single files as whole models: foreign v1/v2/inpainting files load into the pipeline (configs inferred from
shapes, tokenizer given), our own exports (v1 and OpenCLIP v2 layouts) come back bit-identical."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import randomize_
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.data.tokenizer import train_clip_tokenizer
from ldm.diffusion import NoiseSchedule
from ldm.formats import load_sd_checkpoint, save_sd_checkpoint
from ldm.formats.clip_keys import transformers_to_openclip, transformers_to_sd_v1_clip
from ldm.formats.sd_single_file import SD_SAMPLER, read_sd_single_file
from ldm.formats.text_encoder_files import load_clip_tokenizer
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel
from ldm.pipeline import LatentDiffusionPipeline

# Sizes that follow SD's conventions, so that shapes alone give the right config: v1 UNets use 8 heads,
# v2 64-channel heads; CLIP uses 64-channel heads; the VAE 32 GroupNorm groups.
CLIP_WIDTH = 128
V1_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=8,
               context_dim=CLIP_WIDTH, norm_groups=32)
V2_UNET = dict(V1_UNET, num_heads=-1, num_head_channels=64, model_channels=64, use_linear_in_transformer=True)
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=32)
KW = dict(num_inference_steps=3, guidance_scale=4.0, seed=3, progress=False, output_type="pt", height=16, width=16)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_clip_tokenizer(["a red circle", "a blue square", "a photo of a cat"], folder, vocab_size=600)
    return folder


def _clip(tokenizer_dir, hidden_act: str, layers: int = 3) -> CLIPTextModel:
    tok = load_clip_tokenizer(tokenizer_dir)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=layers,
                            num_attention_heads=CLIP_WIDTH // 64, max_position_embeddings=77, hidden_act=hidden_act,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return randomize_(CLIPTextModel(config), seed=5).eval()


def _reference(tokenizer_dir, unet_config, hidden_act, layer, in_channels=4):
    unet = randomize_(UNetModel(**unet_config, in_channels=in_channels), seed=1)
    vae = randomize_(KLAutoencoder(**VAE), seed=2)
    text = TextEncoder(_clip(tokenizer_dir, hidden_act), load_clip_tokenizer(tokenizer_dir), layer=layer)
    return LatentDiffusionPipeline(unet, vae, text, NoiseSchedule(), "epsilon", 0.18215, 16, sampler_config=SD_SAMPLER)


def test_foreign_v1_file_loads_and_generates_like_the_original(tmp_path, tokenizer_dir):
    ref = _reference(tokenizer_dir, V1_UNET, "quick_gelu", "last")
    # A file as other tools write it: SD v1 keys only, no ldm metadata, written with torch.save as a .ckpt.
    state = {f"model.diffusion_model.{k}": v for k, v in ref.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in ref.vae.state_dict().items()}
    state |= {f"cond_stage_model.{k}": v for k, v in transformers_to_sd_v1_clip(ref.text_encoder.model.state_dict()).items()}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "v1.ckpt")

    parts = read_sd_single_file(tmp_path / "v1.ckpt", tokenizer=tokenizer_dir)
    assert (parts.variant, parts.unet_config.in_channels, parts.prediction_type, parts.sample_size) == ("v1", 4, "epsilon", 512)
    assert parts.text_encoder.layer == "last" and parts.scaling_factor == pytest.approx(0.18215)
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "v1.ckpt", tokenizer=tokenizer_dir)
    for a, b in ((ref.unet, pipe.unet), (ref.vae, pipe.vae), (ref.text_encoder.model, pipe.text_encoder.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.testing.assert_close(pipe("a red circle", **KW).images, ref("a red circle", **KW).images, rtol=0, atol=0)


def test_foreign_v2_openclip_file_uses_the_penultimate_layer(tmp_path, tokenizer_dir):
    ref = _reference(tokenizer_dir, V2_UNET, "gelu", "penultimate")
    clip = transformers_to_openclip(ref.text_encoder.model.state_dict())
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in clip
    clip["model.text_projection"] = torch.randn(CLIP_WIDTH, CLIP_WIDTH)  # in real SD 2 files; unused for conditioning
    clip["model.logit_scale"] = torch.tensor(4.6)
    path = save_sd_checkpoint(tmp_path / "v2.safetensors", ref.unet.state_dict(), ref.vae.state_dict(), clip)
    (tmp_path / "v2.yaml").write_text("model:\n  params:\n    parameterization: v\n    scale_factor: 0.5\n")

    pipe = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    assert pipe.text_encoder.layer == "penultimate" and pipe.prediction_type == "v_prediction" and pipe.scaling_factor == 0.5
    assert pipe.text_encoder.model.config.hidden_act == "gelu" and pipe.sample_size == 768
    ids = ref.text_encoder.tokenize(["a blue square"])
    torch.testing.assert_close(pipe.text_encoder(ids), ref.text_encoder(ids), rtol=0, atol=0)
    # The argument wins over the YAML.
    assert LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, prediction_type="epsilon").prediction_type == "epsilon"


def test_inpainting_file_is_detected(tmp_path, tokenizer_dir):
    ref = _reference(tokenizer_dir, V1_UNET, "quick_gelu", "last", in_channels=9)
    path = save_sd_checkpoint(tmp_path / "inpaint.safetensors", ref.unet.state_dict(), ref.vae.state_dict(), ref.text_encoder.model.state_dict())
    parts = read_sd_single_file(path, tokenizer=tokenizer_dir)
    assert parts.unet_config.in_channels == 9

    pipe = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    assert pipe.is_inpainting_model
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, 8:] = 1  # repaint the right half
    small = {k: v for k, v in KW.items() if k not in ("height", "width")}
    out = pipe.inpaint("a red circle", image, mask, paste_unmasked=False, **small).images
    assert out.shape == (1, 3, 16, 16) and len(seen) == 3
    x = seen[0]
    assert x.shape == (2, 9, 8, 8)  # CFG batch; latents, mask, masked-image latents (this VAE downsamples by 2)
    latent_mask = torch.zeros(2, 8, 8)
    latent_mask[..., 4:] = 1
    assert torch.equal(x[:, 4], latent_mask)
    expected = pipe.vae.encode(image * (1 - mask)).mode() * pipe.scaling_factor
    torch.testing.assert_close(x[:1, 5:], expected)
    # The model sees the unmasked image: changing it changes the result; text-to-image works with an all-ones mask.
    latents = dict(small, output_type="latent")
    a = pipe.inpaint("a red circle", image, mask, **latents).images
    b = pipe.inpaint("a red circle", -image, mask, **latents).images
    assert (a - b).abs().max() > 1e-2
    seen.clear()
    assert pipe("a red circle", **KW).images.shape == (1, 3, 16, 16) and bool((seen[0][:, 4] == 1).all())


@pytest.mark.parametrize("hidden_act, layout_key", [("quick_gelu", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
                                                     ("gelu", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")])
def test_our_export_round_trips_bit_identical(tmp_path, tokenizer_dir, hidden_act, layout_key):
    ref = _reference(tokenizer_dir, V1_UNET, hidden_act, "penultimate" if hidden_act == "gelu" else "last")
    path = ref.save_pretrained(tmp_path / "ours.safetensors", format="sd")
    assert layout_key.removeprefix("cond_stage_model.") in load_sd_checkpoint(path)["text_encoder"]
    back = LatentDiffusionPipeline.from_pretrained(path)  # tokenizer and configs come from the file's ldm metadata
    for a, b in ((ref.unet, back.unet), (ref.vae, back.vae), (ref.text_encoder.model, back.text_encoder.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (back.text_encoder.layer, back.sampler_config, back.sample_size) == (ref.text_encoder.layer, SD_SAMPLER, 16)
    torch.testing.assert_close(back("a blue square", **KW).images, ref("a blue square", **KW).images, rtol=0, atol=0)


def test_missing_tokenizer_and_unknown_layouts_are_clear_errors(tmp_path, tokenizer_dir, monkeypatch):
    ref = _reference(tokenizer_dir, V1_UNET, "quick_gelu", "last")
    path = save_sd_checkpoint(tmp_path / "v1.safetensors", ref.unet.state_dict(), ref.vae.state_dict(), ref.text_encoder.model.state_dict())
    monkeypatch.setattr("ldm.formats.sd_single_file.DEFAULT_TOKENIZERS", {"v1": "./no/such/tokenizer", "v2": "./none"})
    with pytest.raises(OSError, match="tokenizer="):
        LatentDiffusionPipeline.from_pretrained(path)

    save_file({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no UNet weights.*decoder.bias"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "other.safetensors")

    state = {f"model.diffusion_model.{k}": v for k, v in ref.unet.state_dict().items()}
    state["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = torch.zeros(3)  # wrong shape
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="input_blocks.1.0.in_layers.0.weight"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "bad.safetensors", tokenizer=tokenizer_dir)

    with pytest.raises(FileNotFoundError, match="not a model"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "missing-folder")


def _foreign_file(ref: LatentDiffusionPipeline, path):
    """A single file as other tools write it: SD keys only (OpenCLIP layout for a gelu CLIP), no ldm metadata."""
    clip = ref.text_encoder.model.state_dict()
    if ref.text_encoder.model.config.hidden_act == "gelu":
        clip = transformers_to_openclip(clip)
    return save_sd_checkpoint(path, ref.unet.state_dict(), ref.vae.state_dict(), clip)


def test_prediction_type_argument_reaches_the_single_file_reader(tmp_path, tokenizer_dir, caplog):
    path = _foreign_file(_reference(tokenizer_dir, V2_UNET, "gelu", "penultimate"), tmp_path / "v2-768-v.safetensors")
    with caplog.at_level("WARNING", logger="ldm.formats.sd_single_file"):
        pipe = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, prediction_type="v_prediction")
    assert (pipe.prediction_type, pipe.sample_size) == ("v_prediction", 768)  # 768-v: the default size follows
    assert "prediction_type" not in caplog.text  # no warning asking for the argument that was given
    assert LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, prediction_type="v").sample_size == 768
    # Without it: epsilon at 512 (SD 2.x base), with the warning that names the argument.
    with caplog.at_level("WARNING", logger="ldm.formats.sd_single_file"):
        pipe = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    assert (pipe.prediction_type, pipe.sample_size) == ("epsilon", 512) and "prediction_type='v_prediction'" in caplog.text
    # The same from a sidecar YAML; the argument wins over it, size included.
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    pipe = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    assert (pipe.prediction_type, pipe.sample_size) == ("v_prediction", 768)
    pipe = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, prediction_type="epsilon")
    assert (pipe.prediction_type, pipe.sample_size) == ("epsilon", 512)


# A v1-style UNet (context width != 1024, conv projections) with 2 heads instead of SD v1's 8: shapes are the same.
TWO_HEADS = dict(V1_UNET, num_heads=2)


def _unet_output(pipe: LatentDiffusionPipeline) -> torch.Tensor:
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    ctx = torch.randn(2, 77, CLIP_WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(x, t, ctx)


def test_head_count_from_yaml_header_or_argument(tmp_path, tokenizer_dir):
    ref = _reference(tokenizer_dir, TWO_HEADS, "quick_gelu", "last")
    expected = _unet_output(ref)
    path = _foreign_file(ref, tmp_path / "custom.safetensors")

    guessed = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)  # SD v1's convention: 8 heads
    assert guessed.unet_config.num_heads == 8
    assert (_unet_output(guessed) - expected).abs().max() > 1e-3  # the wrong count gives other outputs

    by_argument = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, num_heads=2)
    assert (by_argument.unet_config.num_heads, by_argument.unet_config.num_head_channels) == (2, -1)
    torch.testing.assert_close(_unet_output(by_argument), expected, rtol=0, atol=0)
    by_width = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, num_head_channels=16)  # 32 ch: 2 heads
    assert (_unet_output(by_width) - expected).abs().max() > 1e-3  # (64-channel level: 4 heads, not 2)

    yaml = "model:\n  params:\n    unet_config:\n      params:\n        num_heads: 2\n        context_dim: 128\n"
    path.with_suffix(".yaml").write_text(yaml)
    by_yaml = LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    assert by_yaml.unet_config.num_heads == 2
    torch.testing.assert_close(_unet_output(by_yaml), expected, rtol=0, atol=0)
    assert LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, num_heads=8).unet_config.num_heads == 8

    # Our own export keeps its config (heads included) in the header, whatever a YAML beside it says.
    ours = ref.save_pretrained(tmp_path / "ours.safetensors", format="sd")
    ours.with_suffix(".yaml").write_text(yaml.replace("num_heads: 2", "num_heads: 4"))
    torch.testing.assert_close(_unet_output(LatentDiffusionPipeline.from_pretrained(ours)), expected, rtol=0, atol=0)


def test_head_count_errors_and_cli_option(tmp_path, tokenizer_dir):
    from ldm.cli import main

    ref = _reference(tokenizer_dir, TWO_HEADS, "quick_gelu", "last")
    path = _foreign_file(ref, tmp_path / "custom.safetensors")
    with pytest.raises(ValueError, match="num_heads=3"):  # 32 channels do not split into 3 heads
        LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, num_heads=3)
    with pytest.raises(ValueError, match="num_head_channels=0"):
        LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir, num_head_channels=0)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 5\n")
    with pytest.raises(ValueError, match="custom.safetensors.*num_heads"):
        LatentDiffusionPipeline.from_pretrained(path, tokenizer=tokenizer_dir)
    path.with_suffix(".yaml").unlink()

    main(["convert", str(path), str(tmp_path / "converted"), "--to", "ldm", "--tokenizer", str(tokenizer_dir), "--num-heads", "2"])
    converted = LatentDiffusionPipeline.from_pretrained(tmp_path / "converted")
    assert converted.unet_config.num_heads == 2 and converted.sampler_config == SD_SAMPLER
    torch.testing.assert_close(_unet_output(converted), _unet_output(ref), rtol=0, atol=0)
    with pytest.raises(ValueError, match="SD single files"):  # a folder stores its heads
        LatentDiffusionPipeline.from_pretrained(tmp_path / "converted", num_heads=2)
