"""The SD conditional UNet: shapes, parity with diffusers (parameters and numerics), attention reach,
gradient checkpointing and the timestep embedding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ldm.formats.unet_keys import diffusers_to_ldm_unet
from interop_helpers import SD2_DIFFUSERS, SD15_DIFFUSERS, TINY_UNET_DIFFUSERS, randomize_
from ldm.nn.unet import UNetModel
from ldm.nn.unet_blocks import timestep_embedding

TINY_V1 = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=8, context_dim=16)
TINY_V2 = dict(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1,),
    num_head_channels=16,
    context_dim=16,
    use_linear_in_transformer=True,
)



def squeezed_shapes(model: torch.nn.Module) -> Counter:
    return Counter(tuple(d for d in p.shape if d != 1) for p in model.parameters())


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2], ids=["v1-like", "v2-like"])
@pytest.mark.parametrize("size", [(8, 8), (16, 8), (4, 12)])
def test_output_shape_matches_input(config, size):
    unet = UNetModel(**config).eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 999]), torch.randn(2, 7, 16))
    assert out.shape == x.shape


def test_head_configuration_and_projection_kind():
    v1, v2 = UNetModel(**TINY_V1), UNetModel(**TINY_V2)
    # v1: 8 heads at every width; v2: heads of 16 channels (2 at 32 channels, 4 at 64 in the middle).
    assert v1.input_blocks[1][1].transformer_blocks[0].attn1.heads == 8
    assert v1.middle_block[1].transformer_blocks[0].attn1.heads == 8
    assert v2.input_blocks[1][1].transformer_blocks[0].attn1.heads == 2
    assert v2.middle_block[1].transformer_blocks[0].attn1.heads == 4
    assert isinstance(v1.middle_block[1].proj_in, torch.nn.Conv2d)
    assert isinstance(v2.middle_block[1].proj_in, torch.nn.Linear)
    # attention_resolutions=(1,): transformers at full resolution only, none at the downsampled level.
    assert len(v1.input_blocks[3]) == 1 and len(v1.output_blocks[0]) == 1 and len(v1.output_blocks[2]) == 2


def test_indivisible_latent_size_raises():
    unet = UNetModel(**dict(TINY_V1, channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"10x8.*multiple of 4"):
        unet(torch.randn(1, 4, 10, 8), torch.tensor([1]), torch.randn(1, 3, 16))


def test_context_is_required_when_conditional_and_optional_without_context_dim():
    with pytest.raises(ValueError, match="context"):
        UNetModel(**TINY_V1)(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    uncond = UNetModel(**dict(TINY_V1, context_dim=None)).eval()
    assert uncond(torch.randn(1, 4, 8, 8), torch.tensor([1.5])).shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "ours,theirs,expected_count",
    [
        (dict(), SD15_DIFFUSERS, 859_520_964),
        (dict(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True), SD2_DIFFUSERS, 865_910_724),
    ],
    ids=["sd15", "sd2"],
)
def test_full_size_parameter_shapes_match_diffusers(ours, theirs, expected_count):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = UNetModel(**ours)
        reference = diffusers.UNet2DConditionModel(**theirs)
    assert sum(p.numel() for p in unet.parameters()) == expected_count
    assert sum(p.numel() for p in reference.parameters()) == expected_count
    assert squeezed_shapes(unet) == squeezed_shapes(reference)
    # The key map covers the full model and lands on our exact shapes (no reshaping needed).
    mapped = diffusers_to_ldm_unet(reference.state_dict(), ours)
    ours_sd = unet.state_dict()
    assert mapped.keys() == ours_sd.keys()
    assert all(mapped[k].shape == ours_sd[k].shape for k in ours_sd)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (TINY_V1, dict(attention_head_dim=8)),
        (dict(TINY_V2, transformer_depth=2), dict(attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=2)),
    ],
    ids=["v1-like", "v2-like-depth2"],
)
def test_outputs_match_diffusers_with_copied_weights(ours, theirs):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**TINY_UNET_DIFFUSERS, **theirs)
    randomize_(reference).eval()
    unet = UNetModel(**ours).eval()
    unet.load_state_dict(diffusers_to_ldm_unet(reference.state_dict(), ours), strict=True)

    x, context = torch.randn(2, 4, 8, 16), torch.randn(2, 5, 16)
    t = torch.tensor([3, 811])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        got = unet(x, t, context)
    assert expected.abs().mean() > 0.1  # a live network, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def live_tiny_unet() -> UNetModel:
    return randomize_(UNetModel(**TINY_V1), seed=1).eval()


def test_every_context_token_reaches_the_output(live_tiny_unet):
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 16)
    with torch.no_grad():
        base = live_tiny_unet(x, t, context)
        for position in (0, 40, 76):  # 76: a late padding position, still attended as in SD
            changed = context.clone()
            changed[0, position] += 1.0
            assert (live_tiny_unet(x, t, changed) - base).abs().max() > 1e-4, position


def test_self_attention_mixes_all_pixels(live_tiny_unet):
    # Tested on the UNet's own transformer blocks over pixel tokens: LayerNorm and the feed-forward act
    # per token, so a change at pixel 0 can reach the last pixel only through unmasked self-attention.
    # (At the whole-UNet level GroupNorm statistics would also spread it, so that would prove nothing.)
    for block in (live_tiny_unet.input_blocks[1][1].transformer_blocks[0], live_tiny_unet.middle_block[1].transformer_blocks[0]):
        dim = block.norm1.normalized_shape[0]
        tokens, context = torch.randn(1, 64, dim), torch.randn(1, 3, 16)
        changed = tokens.clone()
        changed[0, 0] += torch.randn(dim)  # not a constant shift, which LayerNorm would erase
        with torch.no_grad():
            diff = (block(changed, context) - block(tokens, context)).abs()
        assert diff[0, -1].max() > 1e-4


def test_gradient_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    unet = randomize_(UNetModel(**TINY_V1)).train()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 700]), torch.randn(2, 3, 16)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.zero_grad()
        out = unet(x, t, context)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in unet.parameters()]

    out_plain, grads_plain = run()
    unet.set_gradient_checkpointing(True)
    assert all(m.gradient_checkpointing for m in unet.modules() if hasattr(m, "gradient_checkpointing"))
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain)


def test_timestep_embedding_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 17.5, 999])
    for dim in (320, 33):
        expected = embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), expected)
