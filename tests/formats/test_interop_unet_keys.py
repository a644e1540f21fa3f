"""UNet key map and config conversion against diffusers' UNet2DConditionModel (the oracle)."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import SD2_DIFFUSERS, SD15_DIFFUSERS, TINY_V1, TINY_V2, randomize_

from ldm.formats.unet_keys import diffusers_to_ldm_unet, ldm_to_diffusers_unet, unet_config_from_diffusers, unet_config_to_diffusers
from ldm.nn.unet import UNetModel

SD15_OURS = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(1, 2, 4), context_dim=768, transformer_depth=1, use_linear_in_transformer=False,
    norm_groups=32, num_heads=8, num_head_channels=-1,
)  # fmt: skip
SD2_OURS = dict(SD15_OURS, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)


@pytest.mark.parametrize("theirs,ours", [(SD15_DIFFUSERS, SD15_OURS), (SD2_DIFFUSERS, SD2_OURS)], ids=["sd15", "sd2"])
def test_config_conversion_both_ways(theirs, ours):
    assert unet_config_from_diffusers(theirs) == ours
    back = unet_config_to_diffusers(ours, sample_size=64)
    assert unet_config_from_diffusers(back) == ours
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim"):
        assert tuple(back[key]) == tuple(theirs[key]) if isinstance(theirs[key], tuple) else back[key] == theirs[key]


@pytest.mark.parametrize("theirs", [SD15_DIFFUSERS, SD2_DIFFUSERS], ids=["sd15", "sd2"])
def test_full_size_keys_and_shapes_match_diffusers_on_meta(diffusers, theirs):
    config = unet_config_from_diffusers(theirs)
    with torch.device("meta"):
        ours = UNetModel(**config).state_dict()
        reference = diffusers.UNet2DConditionModel(**theirs).state_dict()
    mapped = ldm_to_diffusers_unet(ours, config)
    assert mapped.keys() == reference.keys()
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    assert diffusers_to_ldm_unet(reference, config).keys() == ours.keys()


@pytest.mark.parametrize("theirs", [TINY_V1, dict(TINY_V2, transformer_layers_per_block=2)], ids=["v1", "v2-depth2"])
def test_tiny_outputs_match_diffusers_and_round_trip_is_exact(diffusers, theirs):
    torch.manual_seed(0)
    reference = randomize_(diffusers.UNet2DConditionModel(**theirs)).eval()
    config = unet_config_from_diffusers(dict(reference.config))
    unet = UNetModel(**config).eval()
    unet.load_state_dict(diffusers_to_ldm_unet(reference.state_dict(), config), strict=True)

    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([3, 811])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        got = unet(x, t, context)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # ours -> diffusers -> ours is bit-identical, and the diffusers side loads into a fresh diffusers model.
    ours_sd = unet.state_dict()
    theirs_sd = ldm_to_diffusers_unet(ours_sd, config)
    back = diffusers_to_ldm_unet(theirs_sd, config)
    assert back.keys() == ours_sd.keys() and all(torch.equal(back[k], ours_sd[k]) for k in ours_sd)
    rebuilt = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config, sample_size=8)).eval()
    rebuilt.load_state_dict(theirs_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, encoder_hidden_states=context).sample, expected, atol=1e-5, rtol=1e-5)


def test_keys_that_do_not_fit_the_config_are_named():
    config = unet_config_from_diffusers(TINY_V1)
    with pytest.raises(KeyError, match="down_blocks.7.resnets.0.norm1.weight"):
        diffusers_to_ldm_unet({"down_blocks.7.resnets.0.norm1.weight": torch.zeros(1)}, config)


def test_unsupported_diffusers_configs_are_rejected():
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers(dict(SD15_DIFFUSERS, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="unequal head widths"):
        unet_config_from_diffusers(dict(SD2_DIFFUSERS, attention_head_dim=(5, 5, 20, 20)))
