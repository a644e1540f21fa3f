"""SDXL LoRA files in both layouts people share, on a tiny random-weight SDXL pipeline (UNet + both text encoders).

* diffusers' layout (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``): a file diffusers' ``StableDiffusionXLPipeline
  .save_lora_weights`` wrote (peft adapters with per-layer ranks, conv layers) generates with our pipeline what it
  generates in diffusers' after ``load_lora_weights``, at scale 1 and 0.5; the file we write back loads in diffusers too.
* kohya's layout (``lora_unet_<SGM path>``, ``lora_te1_*``, ``lora_te2_*``): the file we write is read by diffusers' own
  kohya converter (``load_lora_weights``) and generates the same there, which proves the names are the real ones.
* Both layouts convert into each other with identical tensors; scale 0 is the base model, merged equals unmerged; a
  file for another model is refused, naming the file, and leaves the model as it was.
Tolerances are those of the SDXL generation parity tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))  # the SDXL parity helpers

from test_generation_parity import IMAGE_ATOL, LATENT_TOL  # noqa: E402
from test_lora import TINY, base_unet, tiny_clip  # noqa: E402
from test_sdxl_generation_parity import _build, _diffusers_generate, _ours_generate  # noqa: E402

from ldm.formats.kohya_lora import save_kohya_lora  # noqa: E402
from ldm.formats.lora_files import DIFFUSERS_LORA_FILE, load_lora, save_lora  # noqa: E402
from ldm.nn.lora import TEXT_ENCODER_TARGETS, add_lora, lora_layer_hparams, lora_layers, lora_state_dict  # noqa: E402
from ldm.nn.text_encoder import TextEncoder  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402

# Every kind of layer kohya adapts in SDXL's UNet (attention, projections, feed-forward, resnet convs and time
# projections, 1x1 shortcuts, down/upsampling convs), plus the embedding MLPs and conv_in/conv_out.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "in_layers.2",
                "out_layers.3", "emb_layers.1", "skip_connection", "op", "conv", "time_embed.0",
                "label_emb.0.0", "input_blocks.0.0", "out.2"]
TEXT_TARGETS = [*TEXT_ENCODER_TARGETS, "fc1", "fc2"]
# A layer with its own alpha. Not an attention projection: diffusers 0.42's kohya converter loses the alpha of a
# to_q/to_k/to_v/to_out.0 layer whose alpha differs from the rest (its alpha_pattern key keeps "processor.to_k_lora.down.
# weight" and matches nothing; peft warns), so such a layer cannot be compared with diffusers.
ODD = "middle_block.1.proj_out"


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_lora_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _adapt_(pipe) -> None:
    """Adapters on our SDXL pipeline's UNet (rank 4 / alpha 2; convs rank 2 / alpha 2; one layer alpha 8) and on both
    text encoders (rank 2 / alpha 4 and rank 3 / alpha 3)."""
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and (n in UNET_TARGETS or n.endswith(tuple("." + t for t in UNET_TARGETS)))}  # skip_connection: 1x1 convs only
    convs = [n for n, m in layers.items() if isinstance(m, torch.nn.Conv2d)]
    add_lora(pipe.unet, rank=4, alpha=2, target_modules=sorted(layers), rank_pattern={c: 2 for c in convs},
             alpha_pattern={**{c: 2.0 for c in convs}, ODD: 8.0})
    add_lora(pipe.text_encoder.first, rank=2, alpha=4, target_modules=TEXT_TARGETS)
    add_lora(pipe.text_encoder.second, rank=3, alpha=3, target_modules=TEXT_TARGETS)
    for seed, module in enumerate((pipe.unet, pipe.text_encoder.first, pipe.text_encoder.second)):
        _randomize_lora_(module, seed=10 + seed)


def _keys(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_same_file(a: Path, b: Path) -> None:
    (first, meta_a), (second, meta_b) = _keys(a), _keys(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert meta_a == meta_b


def _no_adapters(pipe) -> bool:
    return not any(lora_layers(m) for m in (pipe.unet, pipe.text_encoder))


def _latents(pipe) -> torch.Tensor:
    return _ours_generate(pipe, "latent")[1]


def _reference(diffusers, root: Path):
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(root / "sdxl"))
    theirs.set_progress_bar_config(disable=True)
    return theirs


def _assert_generates_like(ours, theirs, **diffusers_kwargs) -> torch.Tensor:
    expected, expected_latents = _diffusers_generate(theirs, **diffusers_kwargs)
    images, latents = _ours_generate(ours)
    torch.testing.assert_close(latents, expected_latents, **LATENT_TOL)
    torch.testing.assert_close((images + 1) / 2, expected, atol=IMAGE_ATOL, rtol=0)
    return latents


# ------------------------------------------------------------------------------------- diffusers' layout


def test_a_diffusers_sdxl_lora_generates_as_in_diffusers_and_ours_loads_there(diffusers, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    reference, ours = _build(diffusers, tmp_path)
    base = _latents(ours)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                           rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 4.0, "proj_in": 8.0}),
        "text_encoder": LoraConfig(r=2, lora_alpha=4, target_modules=TEXT_TARGETS),
        "text_encoder_2": LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj", "fc2"]),
    }
    layers, metadata = {}, {}
    for seed, (part, config) in enumerate(configs.items()):
        module = getattr(reference, part)
        _randomize_lora_(inject_adapter_in_model(config, module), seed=20 + seed)
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        metadata[f"{part}_lora_adapter_metadata"] = config.to_dict()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(tmp_path / "theirs", **layers, **metadata)
    keys, _ = _keys(tmp_path / "theirs" / DIFFUSERS_LORA_FILE)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}

    theirs = _reference(diffusers, tmp_path)
    theirs.load_lora_weights(tmp_path / "theirs")
    ours.load_lora(tmp_path / "theirs")
    hparams = lora_layer_hparams(ours.unet)
    assert hparams["input_blocks.1.0.in_layers.2"] == (2, 4.0) and hparams["middle_block.1.proj_in"] == (4, 8.0)
    latents = _assert_generates_like(ours, theirs)
    assert (latents - base).abs().max() > 100 * LATENT_TOL["atol"]  # the adapters matter at this tolerance
    ours.set_lora_scale(0.5)  # diffusers scales the UNet's and both text encoders' adapters by cross_attention_kwargs
    half = _assert_generates_like(ours, theirs, cross_attention_kwargs={"scale": 0.5})
    assert (half - latents).abs().max() > 100 * LATENT_TOL["atol"]

    ours.set_lora_scale(1.0)
    written = save_lora(tmp_path / "ours" / DIFFUSERS_LORA_FILE, unet=ours.unet, text_encoder=ours.text_encoder)
    meta = json.loads(_keys(written)[1]["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and set(meta["unet.rank_pattern"].values()) == {2} and meta["text_encoder_2.r"] == 3
    again = _reference(diffusers, tmp_path)
    again.load_lora_weights(tmp_path / "ours")
    _assert_generates_like(ours, again)


# ----------------------------------------------------------------------------------------- kohya's layout


def test_our_kohya_sdxl_file_has_sgm_names_and_diffusers_generates_the_same_with_it(diffusers, tmp_path):
    _, ours = _build(diffusers, tmp_path)
    base = _latents(ours)
    _adapt_(ours)
    path = save_kohya_lora(tmp_path / "style.safetensors", unet=ours.unet, text_encoder=ours.text_encoder)
    keys, meta = _keys(path)
    assert keys["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (4, 32)
    assert keys["lora_unet_middle_block_1_proj_out.alpha"].item() == 8.0
    assert keys["lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.alpha"].item() == 2.0
    assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_0_proj.lora_down.weight" in keys
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 16, 3, 3)  # conv LoRA
    assert keys["lora_unet_output_blocks_1_2_conv.lora_up.weight"].shape == (32, 2, 1, 1)
    assert keys["lora_unet_input_blocks_2_0_op.alpha"].item() == 2.0
    assert {"lora_unet_label_emb_0_0.alpha", "lora_unet_time_embed_0.alpha", "lora_unet_out_2.alpha"} <= keys.keys()
    assert keys["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 4.0
    assert keys["lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_down.weight"].shape == (3, 32)
    layers = sum(len(lora_layers(m)) for m in (ours.unet, ours.text_encoder))
    assert len(keys) == 3 * layers and {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "mixed"

    theirs = _reference(diffusers, tmp_path)
    theirs.load_lora_weights(str(tmp_path), weight_name=path.name)  # diffusers' kohya converter, SGM block map
    for theirs_part, our_part in ((theirs.unet, ours.unet), (theirs.text_encoder, ours.text_encoder.first),
                                  (theirs.text_encoder_2, ours.text_encoder.second)):  # every layer found its module
        assert sum(".lora_A." in n for n, _ in theirs_part.named_parameters()) == len(lora_layers(our_part))
    latents = _assert_generates_like(ours, theirs)
    assert (latents - base).abs().max() > 100 * LATENT_TOL["atol"]
    lora_layers(ours.unet)[ODD].scaling["default"] = 0.5  # as if its alpha were the others': visible at this tolerance
    assert (_latents(ours) - latents).abs().max() > 100 * LATENT_TOL["atol"]


def test_both_layouts_convert_into_each_other_with_identical_tensors(diffusers, tmp_path):
    _, trained = _build(diffusers, tmp_path)
    _adapt_(trained)
    expected = _latents(trained)

    def fresh():
        return LatentDiffusionPipeline.from_pretrained(tmp_path / "sdxl")

    first_diffusers = save_lora(tmp_path / "d1.safetensors", unet=trained.unet, text_encoder=trained.text_encoder)
    via = fresh().load_lora(first_diffusers)  # diffusers layout -> ours -> kohya layout -> ours -> diffusers layout
    first_kohya = save_kohya_lora(tmp_path / "k1.safetensors", unet=via.unet, text_encoder=via.text_encoder)
    back = fresh().load_lora(first_kohya)
    assert lora_layer_hparams(back.unet) == lora_layer_hparams(trained.unet)
    assert lora_layer_hparams(back.text_encoder) == lora_layer_hparams(trained.text_encoder)
    _assert_same_file(first_diffusers, save_lora(tmp_path / "d2.safetensors", unet=back.unet, text_encoder=back.text_encoder))
    torch.testing.assert_close(_latents(back), expected, atol=1e-6, rtol=0)

    again = fresh().load_lora(save_lora(tmp_path / "d3.safetensors", unet=back.unet, text_encoder=back.text_encoder))
    _assert_same_file(first_kohya, save_kohya_lora(tmp_path / "k2.safetensors", unet=again.unet, text_encoder=again.text_encoder))
    # The two text encoders alone, given one by one, are written the same way (SDXL prefixes, per-layer alphas).
    alone, _ = _keys(save_kohya_lora(tmp_path / "te.safetensors", text_encoder=again.text_encoder.first,
                                     text_encoder_2=again.text_encoder.second))
    kohya, _ = _keys(first_kohya)
    assert alone.keys() == {k for k in kohya if k.startswith("lora_te")}


def test_scale_zero_is_the_base_model_and_merged_equals_unmerged(diffusers, tmp_path):
    _, pipe = _build(diffusers, tmp_path)
    base = _latents(pipe)
    _adapt_(pipe)
    path = save_kohya_lora(tmp_path / "k.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder)
    full = _latents(pipe)
    target = LatentDiffusionPipeline.from_pretrained(tmp_path / "sdxl").load_lora(path, scale=0.0)
    torch.testing.assert_close(_latents(target), base, atol=1e-6, rtol=0)
    target.set_lora_scale(0.7)
    scaled = _latents(target)
    assert (scaled - base).abs().max() > 100 * LATENT_TOL["atol"] and (scaled - full).abs().max() > 100 * LATENT_TOL["atol"]
    target.merge_lora()
    assert _no_adapters(target)
    torch.testing.assert_close(_latents(target), scaled, **LATENT_TOL)
    target.save_pretrained(tmp_path / "merged")  # a plain SDXL model again
    target.load_lora(path, scale=0.3)  # and it takes a LoRA again
    assert len(lora_layers(target.text_encoder.second)) == len(lora_layers(pipe.text_encoder.second))


# ---------------------------------------------------------------------------------------- wrong files


def test_files_for_another_model_are_refused_and_leave_the_model_as_it_was(diffusers, tmp_path):
    _, pipe = _build(diffusers, tmp_path)
    base = _latents(pipe)

    def sd1_pipe():
        return SimpleNamespace(unet=base_unet(), text_encoder=TextEncoder(tiny_clip(), tokenizer=None, max_length=8).eval())

    sd1 = sd1_pipe()
    add_lora(sd1.unet, rank=2)
    add_lora(sd1.text_encoder, rank=2, target_modules=TEXT_ENCODER_TARGETS)
    sd1_file = save_kohya_lora(tmp_path / "sd15_style.safetensors", unet=sd1.unet, text_encoder=sd1.text_encoder)
    with pytest.raises(ValueError, match=r"sd15_style\.safetensors is an SD 1\.x/2\.x LoRA .* this model is SDXL"):
        pipe.load_lora(sd1_file)
    unet_only = save_kohya_lora(tmp_path / "sd15_unet.safetensors", unet=sd1.unet)  # no lora_te_ keys to tell
    with pytest.raises(ValueError, match=r"sd15_unet\.safetensors: \d+ unet layer\(s\) of the file do not exist in this "
                                         r"UNetModel.*lora_unet_down_blocks_0_attentions_0"):
        pipe.load_lora(unet_only)
    assert _no_adapters(pipe)
    torch.testing.assert_close(_latents(pipe), base, atol=0, rtol=0)

    trained = LatentDiffusionPipeline.from_pretrained(tmp_path / "sdxl")
    _adapt_(trained)
    good = save_kohya_lora(tmp_path / "xl_style.safetensors", unet=trained.unet, text_encoder=trained.text_encoder)
    with pytest.raises(ValueError, match=r"xl_style\.safetensors is an SDXL LoRA .* SD 1\.x/2\.x-shaped"):
        load_lora(sd1_pipe(), good)
    with pytest.raises(ValueError, match=r"sd_diffusers\.safetensors holds text_encoder_2 adapters but the target has no"):
        load_lora(sd1_pipe(), save_lora(tmp_path / "sd_diffusers.safetensors", text_encoder=trained.text_encoder))

    # The UNet and the first text encoder load, then the second's layer 7 does not exist: all of it is undone, on a
    # pipeline without adapters and on one whose adapters (another file's) stay as they were.
    tensors, _ = _keys(good)
    layer = "lora_te2_text_model_encoder_layers_{}_self_attn_q_proj"
    tensors |= {layer.format(7) + s: tensors[layer.format(0) + s].clone() for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    save_file(tensors, str(tmp_path / "extra_layer.safetensors"))
    with pytest.raises(ValueError, match=r"extra_layer\.safetensors: 1 text_encoder_2 layer\(s\).*layers_7_self_attn_q_proj"):
        pipe.load_lora(tmp_path / "extra_layer.safetensors")
    assert _no_adapters(pipe)
    torch.testing.assert_close(_latents(pipe), base, atol=0, rtol=0)
    pipe.load_lora(good, scale=0.5)
    before = {m: lora_state_dict(getattr(pipe.text_encoder, m)) for m in ("first", "second")}
    loaded = _latents(pipe)
    with pytest.raises(ValueError, match=r"extra_layer\.safetensors"):
        pipe.load_lora(tmp_path / "extra_layer.safetensors")
    torch.testing.assert_close(_latents(pipe), loaded, atol=0, rtol=0)
    assert all(torch.equal(before[m][k], v) for m in before for k, v in lora_state_dict(getattr(pipe.text_encoder, m)).items())
    assert TINY["model_channels"] == 32  # the SD 1.x model above


def test_adapters_put_on_the_clip_models_as_training_does_are_written_for_both_encoders(diffusers, tmp_path):
    _, pipe = _build(diffusers, tmp_path)
    base = _latents(pipe)
    add_lora(pipe.unet, rank=2)
    for seed, encoder in enumerate(pipe.text_encoder.encoders):  # ldm.formats.lightning_ckpt: on each CLIP model
        _randomize_lora_(add_lora(encoder.model, rank=2, alpha=1, target_modules=TEXT_ENCODER_TARGETS), seed=30 + seed)
    expected = _latents(pipe)
    assert (expected - base).abs().max() > 100 * LATENT_TOL["atol"]
    for path in (save_lora(tmp_path / "d.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder),
                 save_kohya_lora(tmp_path / "k.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder)):
        parts = {k.split(".")[0] if k.startswith(("unet.", "text_")) else k.split("_")[1] for k in _keys(path)[0]}
        assert parts in ({"unet", "text_encoder", "text_encoder_2"}, {"unet", "te1", "te2"})
        back = LatentDiffusionPipeline.from_pretrained(tmp_path / "sdxl").load_lora(path)
        torch.testing.assert_close(_latents(back), expected, atol=1e-6, rtol=0)


def test_an_sdxl_kohya_file_written_by_diffusers_converter_with_diffusers_unet_names_is_read_too(diffusers, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya

    _, trained = _build(diffusers, tmp_path)
    _adapt_(trained)
    peft, _ = _keys(save_lora(tmp_path / "d.safetensors", unet=trained.unet, text_encoder=trained.text_encoder))
    # The first encoder's keys as transformers v5's flattened CLIPTextModel names them (no "text_model.").
    peft = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in peft.items()}
    kohya = convert_state_dict_to_kohya(peft)  # what diffusers' SDXL training scripts write for the UIs
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_te1_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "converted.safetensors"))
    back = LatentDiffusionPipeline.from_pretrained(tmp_path / "sdxl").load_lora(tmp_path / "converted.safetensors")
    for ours, theirs in ((back.unet, trained.unet), (back.text_encoder, trained.text_encoder)):
        mine, expected = lora_state_dict(ours), lora_state_dict(theirs)
        assert mine.keys() == expected.keys() and all(torch.equal(mine[k], expected[k]) for k in mine)
        # diffusers' converter writes alpha = rank for every layer (the adapters' own alphas are not kept).
        assert all(alpha == rank for rank, alpha in lora_layer_hparams(ours).values())
    assert {r for r, _ in lora_layer_hparams(back.unet).values()} == {2, 4}
