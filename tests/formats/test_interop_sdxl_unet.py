"""The SDXL UNet (per-level transformer depth, the text_time vector conditioning) against diffusers'
UNet2DConditionModel: configs both ways, the published full-size key set on the meta device, tiny outputs."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import SDXL_DIFFUSERS, TINY_SDXL_UNET_DIFFUSERS, randomize_

from ldm.formats.unet_keys import diffusers_to_ldm_unet, ldm_to_diffusers_unet, unet_config_from_diffusers, unet_config_to_diffusers
from ldm.nn.configs import SDXL_BASE_UNET, ConfigError, UNetConfig
from ldm.nn.micro_conditioning import sdxl_vector
from ldm.nn.unet import UNetModel


def test_sdxl_config_reads_as_sgm_writes_it_and_converts_back():
    ours = unet_config_from_diffusers(SDXL_DIFFUSERS)
    assert UNetConfig.from_dict(ours) == UNetConfig(**SDXL_BASE_UNET, in_channels=4, out_channels=4)
    assert ours["transformer_depth"] == (0, 2, 10) and ours["adm_in_channels"] == 2816
    back = unet_config_to_diffusers(ours, sample_size=128)
    assert unet_config_from_diffusers(back) == ours
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim", "addition_embed_type"):
        assert back[key] == (list(SDXL_DIFFUSERS[key]) if isinstance(SDXL_DIFFUSERS[key], tuple) else SDXL_DIFFUSERS[key]), key
    assert back["transformer_layers_per_block"][1:] == [2, 10]


def test_full_size_sdxl_unet_has_diffusers_keys_shapes_and_the_published_parameter_count(diffusers):
    config = unet_config_from_diffusers(SDXL_DIFFUSERS)
    with torch.device("meta"):
        unet = UNetModel(**config)
        reference = diffusers.UNet2DConditionModel(**SDXL_DIFFUSERS).state_dict()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    ours = unet.state_dict()
    mapped = ldm_to_diffusers_unet(ours, config)
    assert mapped.keys() == reference.keys()
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    assert diffusers_to_ldm_unet(reference, config).keys() == ours.keys()
    assert len([k for k in ours if k.startswith("middle_block.1.transformer_blocks.") and k.endswith("attn1.to_q.weight")]) == 10


def test_tiny_sdxl_unet_matches_diffusers_with_micro_conditioning(diffusers):
    torch.manual_seed(0)
    reference = randomize_(diffusers.UNet2DConditionModel(**TINY_SDXL_UNET_DIFFUSERS)).eval()
    config = unet_config_from_diffusers(dict(reference.config))
    unet = UNetModel(**config).eval()
    unet.load_state_dict(diffusers_to_ldm_unet(reference.state_dict(), config), strict=True)

    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([3, 811])
    pooled = torch.randn(2, 16)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 64.0, 0.0, 768.0, 1024.0]])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = unet(x, t, context, y=sdxl_vector(pooled, time_ids, 8))
        other_ids = unet(x, t, context, y=sdxl_vector(pooled, time_ids.flip(0), 8))
    assert expected.abs().mean() > 0.03  # a non-trivial output (random weights of scale 0.1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (other_ids - got).abs().max() > 1e-3  # the size/crop ids reach the output

    theirs_sd = ldm_to_diffusers_unet(unet.state_dict(), config)
    rebuilt = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config, sample_size=8)).eval()
    rebuilt.load_state_dict(theirs_sd, strict=True)


def test_vector_conditioning_is_checked():
    unet = UNetModel(**unet_config_from_diffusers(TINY_SDXL_UNET_DIFFUSERS)).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match=r"vector conditioning y of shape \(1, 64\).*got none"):
        unet(x, 1, context)
    with pytest.raises(ValueError, match=r"got shape \(1, 63\)"):
        unet(x, 1, context, y=torch.zeros(1, 63))
    plain = UNetModel(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2, context_dim=32,
                      norm_groups=8)
    with pytest.raises(ValueError, match="takes no vector conditioning"):
        plain(x, 1, context, y=torch.zeros(1, 64))


def test_per_level_depth_configs_are_checked():
    with pytest.raises(ConfigError, match="transformer_depth: has 2 entries for the 3 levels"):
        UNetConfig(**{**SDXL_BASE_UNET, "transformer_depth": (2, 10)})
    with pytest.raises(ConfigError, match="transformer_depth_middle"):
        UNetConfig(**{**SDXL_BASE_UNET, "transformer_depth": (0, 2, 0)})
    with pytest.raises(ConfigError, match="adm_in_channels, addition_time_embed_dim: set both"):
        UNetConfig(**{**SDXL_BASE_UNET, "addition_time_embed_dim": None})
    with pytest.raises(ConfigError, match="transformer_depth"):
        UNetConfig(**{**SDXL_BASE_UNET, "transformer_depth": (0, -1, 10)})


# The published SDXL refiner 1.0 UNet config (context 1280 from bigG alone; vector 2560 = pooled 1280 + 5 ids x 256,
# the fifth id the aesthetic score).
SDXL_REFINER_DIFFUSERS = dict(
    SDXL_DIFFUSERS, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=1280, attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
    projection_class_embeddings_input_dim=2560,
)


def test_refiner_unet_builds_with_diffusers_keys_and_shapes(diffusers):
    config = unet_config_from_diffusers(SDXL_REFINER_DIFFUSERS)
    assert config["transformer_depth"] == 4 and config["attention_resolutions"] == (2, 4)
    with torch.device("meta"):
        ours = UNetModel(**config).state_dict()
        reference = diffusers.UNet2DConditionModel(**SDXL_REFINER_DIFFUSERS).state_dict()
    mapped = ldm_to_diffusers_unet(ours, config)
    assert mapped.keys() == reference.keys() and all(mapped[k].shape == reference[k].shape for k in reference)
