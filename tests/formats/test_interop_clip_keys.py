"""Text encoder layouts: SD v1 single-file CLIP and SD v2 OpenCLIP -> transformers CLIPTextModel."""

from __future__ import annotations

import torch
from interop_helpers import randomize_, tiny_clip_config
from transformers import CLIPTextModel

from ldm.formats.clip_keys import clip_state_prefix, openclip_to_transformers, sd_v1_clip_to_transformers, transformers_to_sd_v1_clip


def to_openclip(state_dict: dict[str, torch.Tensor], projection_dim: int) -> dict[str, torch.Tensor]:
    """The inverse map, written independently: CLIPTextModel weights -> SD v2 ``cond_stage_model.model.*``."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    width = sd["embeddings.token_embedding.weight"].shape[1]
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": torch.randn(width, projection_dim),
        "logit_scale": torch.tensor(4.6),
    }
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    return {f"cond_stage_model.model.{k}": v for k, v in out.items()}


def test_sd_v1_layout_round_trip_with_either_prefix():
    model = randomize_(CLIPTextModel(tiny_clip_config()))
    sd = model.state_dict()
    v1 = transformers_to_sd_v1_clip(sd)
    assert all(k.startswith("transformer.text_model.") for k in v1)
    # A transformers v4 file also holds the position_ids buffer, dropped on load.
    v1_file = {f"cond_stage_model.{k}": v for k, v in v1.items()}
    v1_file["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    back = sd_v1_clip_to_transformers(v1_file)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # v4-style keys (text_model.*) map to the same SD layout.
    assert transformers_to_sd_v1_clip({f"text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}).keys() == v1.keys()
    assert clip_state_prefix() in ("", "text_model.")


def test_openclip_layout_gives_identical_outputs():
    torch.manual_seed(0)
    config = tiny_clip_config(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3, hidden_act="gelu")
    model = randomize_(CLIPTextModel(config), scale=0.2).eval()
    open_sd = to_openclip(model.state_dict(), projection_dim=24)
    open_sd["cond_stage_model.model.visual.conv1.weight"] = torch.zeros(1)  # ignored

    sd, converted_config = openclip_to_transformers(open_sd, head_width=16)
    assert converted_config.hidden_act == "gelu" and converted_config.num_hidden_layers == 3
    assert converted_config.num_attention_heads == 2 and converted_config.projection_dim == 24
    rebuilt = CLIPTextModel(converted_config).eval()
    rebuilt.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 998, (2, 77))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True)
        got = rebuilt(ids, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=0, rtol=0)

    # SD v2's penultimate layer: dropping the last layer and reading the last hidden state equals
    # reading hidden_states[-2] through the final layer norm of the full model.
    short_sd, short_config = openclip_to_transformers(open_sd, head_width=16, drop_last_layers=1)
    short = CLIPTextModel(short_config).eval()
    short.load_state_dict(short_sd, strict=True)
    with torch.no_grad():
        penultimate = rebuilt.final_layer_norm(expected.hidden_states[-2]) if hasattr(rebuilt, "final_layer_norm") else rebuilt.text_model.final_layer_norm(expected.hidden_states[-2])
        torch.testing.assert_close(short(ids).last_hidden_state, penultimate, atol=1e-6, rtol=1e-6)
