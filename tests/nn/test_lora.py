"""LoRA on the UNet and the CLIP text encoder: training touches only adapters, save/load/scale/merge,
and the saved file loads in diffusers (the oracle) with the same numerics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from interop_helpers import TINY_UNET_DIFFUSERS, randomize_
from ldm.formats.lora_files import load_lora, save_lora, unet_module_names_to_diffusers
from ldm.nn.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, keep_lora_fp32, lora_layers, lora_state_dict, merge_lora, set_lora_scale
from ldm.nn.unet import UNetModel

TINY = dict(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=8, context_dim=16, norm_groups=8
)
TINY_DIFFUSERS = dict(  # the shared tiny config, with attention at both levels as in TINY
    TINY_UNET_DIFFUSERS,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,  # diffusers' SD naming: this is the number of heads
    norm_num_groups=8,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def base_unet(seed: int = 0) -> UNetModel:
    return randomize_(UNetModel(**TINY), seed).eval()


def randomize_lora_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-zero lora_B (a fresh adapter is a no-op), without training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


INPUTS = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([3, 700]),
          torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6)))


def run(unet: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(*INPUTS)


@pytest.fixture(scope="module")
def trained() -> tuple[UNetModel, dict[str, torch.Tensor], list[float]]:
    """A tiny UNet with a rank-4, alpha-8 adapter trained a few steps; its base weights before training."""
    torch.manual_seed(0)
    unet = base_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    add_lora(unet, rank=4, alpha=8)
    unet.train()
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    x, t, ctx = INPUTS
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(6):
        loss = (unet(x, t, ctx) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return unet.eval(), before, losses


def test_only_lora_trains_and_loss_drops(trained):
    unet, before, losses = trained
    assert isinstance(unet, UNetModel)
    assert len(lora_layers(unet)) == 4 * 2 * 7  # q,k,v,out x (attn1, attn2) x 7 transformers
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert losses[-1] < losses[0]
    after = unet.state_dict()
    for key, value in before.items():  # base weights (now under .base_layer for adapted layers) unchanged
        new_key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(after[new_key], value, rtol=0, atol=0)
    assert any(v.abs().max() > 0 for k, v in lora_state_dict(unet).items() if "lora_B" in k)


def test_adapter_file_is_small_and_in_diffusers_layout(trained, tmp_path):
    unet, _, _ = trained
    path = save_lora(tmp_path / "a.safetensors", unet=unet, alpha=8, rank=4)
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert path.stat().st_size < 0.1 * unet_bytes
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight" in keys
    assert len(keys) == 2 * len(lora_layers(unet))
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    with pytest.raises(ValueError, match="rank"):
        save_lora(tmp_path / "b.safetensors", unet=unet, rank=8)


def test_round_trip_and_scale(trained, tmp_path):
    unet, _, _ = trained
    path = save_lora(tmp_path / "a.safetensors", unet=unet)
    fresh = base_unet()
    base_out = run(fresh)
    load_lora(fresh, path)
    trained_out = run(unet)
    assert (trained_out - base_out).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(run(fresh), trained_out, atol=1e-6, rtol=0)
    set_lora_scale(fresh, 0.0)
    torch.testing.assert_close(run(fresh), base_out, atol=1e-6, rtol=0)
    half = base_unet()
    load_lora(half, path, scale=0.5)
    out_half = run(half)
    assert (out_half - trained_out).abs().max() > 1e-4 and (out_half - base_out).abs().max() > 1e-4


def test_merge_matches_unmerged(trained, tmp_path):
    unet, _, _ = trained
    model = base_unet()
    load_lora(model, save_lora(tmp_path / "a.safetensors", unet=unet), scale=0.7)
    expected = run(model)
    merge_lora(model)
    assert not lora_layers(model)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    UNetModel(**TINY).load_state_dict(model.state_dict())  # plain UNet key layout again
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=0)


def test_lora_stays_fp32_under_bf16_base():
    unet = randomize_lora_(add_lora(base_unet(), rank=2))
    reference = run(unet)
    keep_lora_fp32(unet.to(torch.bfloat16))
    dtypes = {n: p.dtype for n, p in unet.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    x, t, ctx = INPUTS
    with torch.no_grad():
        out = unet(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_load_rejects_foreign_layout(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"  # neither diffusers' layout nor kohya's (tests/nn/test_lora_kohya.py)
    save_file({"transformer.blocks.0.lora.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="diffusers/peft LoRA layout"):
        load_lora(base_unet(), path)
    with pytest.raises(FileNotFoundError):
        load_lora(base_unet(), tmp_path / "missing.safetensors")


def tiny_clip(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def clip_out(model: CLIPTextModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[0, 5, 9, 12, 1, 1, 1, 1]])).last_hidden_state


def test_text_encoder_round_trip_and_key_names(tmp_path):
    clip = randomize_lora_(add_lora(tiny_clip(), rank=2, alpha=4, target_modules=TEXT_ENCODER_TARGETS))
    assert all(".lora_" in n for n, p in clip.named_parameters() if p.requires_grad)
    path = save_lora(tmp_path / "te.safetensors", text_encoder=clip)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 4 * 2
    fresh = tiny_clip()
    base = clip_out(fresh)
    load_lora(fresh, path)
    torch.testing.assert_close(clip_out(fresh), clip_out(clip), atol=1e-6, rtol=0)
    assert (clip_out(fresh) - base).abs().max() > 1e-3


# ------------------------------------------------------------------------------ diffusers as the oracle


def diffusers_pair(seed: int = 0):
    """A tiny diffusers UNet and our UNet with the same weights (mapped by our module-name map)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    reference = randomize_(diffusers.UNet2DConditionModel(**TINY_DIFFUSERS), seed).eval()
    unet = UNetModel(**TINY).eval()
    names = unet_module_names_to_diffusers(unet)
    theirs = reference.state_dict()
    mapped = {}
    for key in unet.state_dict():
        module, _, param = key.rpartition(".")
        mapped[key] = theirs[f"{names[module]}.{param}"]
    assert len(mapped) == len(theirs)  # every diffusers tensor is used exactly once
    unet.load_state_dict(mapped, strict=True)
    return reference, unet


# The default (attention projections), and those plus the transformer blocks' feed-forward layers (the demo LoRA recipe).
@pytest.mark.parametrize("targets", [UNET_TARGETS, (*UNET_TARGETS, "ff.net.0.proj", "ff.net.2")], ids=["attention", "attention+ff"])
def test_unet_lora_loads_in_diffusers_with_same_output(tmp_path, targets):
    lora_pipeline = pytest.importorskip("diffusers.loaders.lora_pipeline")
    reference, unet = diffusers_pair()
    x, t, ctx = INPUTS
    with torch.no_grad():
        base_theirs = reference(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(run(unet), base_theirs, atol=1e-5, rtol=1e-5)  # the name map is right

    randomize_lora_(add_lora(unet, rank=4, alpha=2, target_modules=targets))  # alpha != rank: the metadata must carry the scale
    assert any(name.endswith("ff.net.2") for name in lora_layers(unet)) == ("ff.net.2" in targets)
    path = save_lora(tmp_path / "unet_lora.safetensors", unet=unet)
    # What pipeline.load_lora_weights(path) does for the UNet. (Note: unet.load_lora_adapter(path) only reads
    # the metadata, hence alpha, with use_safetensors=True; without it diffusers assumes alpha = rank.)
    state_dict, network_alphas, metadata = lora_pipeline.StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    assert network_alphas is None and metadata["unet.lora_alpha"] == 2
    lora_pipeline.StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, None, reference, metadata=metadata)
    with torch.no_grad():
        theirs = reference(x, t, encoder_hidden_states=ctx).sample
    ours = run(unet)
    assert (ours - base_theirs).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [TEXT_ENCODER_TARGETS, (*TEXT_ENCODER_TARGETS, "fc1", "fc2")], ids=["attention", "attention+mlp"])
def test_text_encoder_lora_loads_in_diffusers_with_same_output(tmp_path, targets):
    lora_pipeline = pytest.importorskip("diffusers.loaders.lora_pipeline")
    clip = randomize_lora_(add_lora(tiny_clip(), rank=2, alpha=4, target_modules=targets))
    assert any(name.endswith("mlp.fc1") for name in lora_layers(clip)) == ("fc1" in targets)
    path = save_lora(tmp_path / "te.safetensors", text_encoder=clip)
    state_dict, network_alphas, metadata = lora_pipeline.StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    assert network_alphas is None and metadata["text_encoder.lora_alpha"] == 4
    theirs = tiny_clip()
    lora_pipeline.StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state_dict, network_alphas=None, text_encoder=theirs, prefix="text_encoder", metadata=metadata
    )
    torch.testing.assert_close(clip_out(theirs), clip_out(clip), atol=1e-5, rtol=1e-5)


def test_pipeline_like_target_loads_unet_and_text_encoder_from_one_file(tmp_path):
    from types import SimpleNamespace

    from ldm.nn.text_encoder import TextEncoder

    def pipe() -> SimpleNamespace:  # what load_lora needs of LatentDiffusionPipeline: .unet and .text_encoder
        return SimpleNamespace(unet=base_unet(), text_encoder=TextEncoder(tiny_clip(), tokenizer=None, max_length=8).eval())

    ids = torch.tensor([[0, 5, 9, 12, 1, 1, 1, 1]])
    source = pipe()
    randomize_lora_(add_lora(source.unet, rank=4))
    randomize_lora_(add_lora(source.text_encoder, rank=2, alpha=1, target_modules=TEXT_ENCODER_TARGETS), seed=3)
    path = save_lora(tmp_path / "both.safetensors", unet=source.unet, text_encoder=source.text_encoder)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in keys  # no wrapper "model."
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}

    target = pipe()
    load_lora(target, path)
    torch.testing.assert_close(run(target.unet), run(source.unet), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(target.text_encoder(ids), source.text_encoder(ids), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="text_encoder"):
        load_lora(SimpleNamespace(unet=base_unet(), text_encoder=None), path)
