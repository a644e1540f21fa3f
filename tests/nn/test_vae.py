import math

import pytest
import torch
import torch.nn.functional as F
from interop_helpers import SD_VAE_DIFFUSERS

from ldm.nn import DiagonalGaussianDistribution, KLAutoencoder, NLayerDiscriminator
from ldm.nn.vae_blocks import AttnBlock


@pytest.mark.parametrize("ch_mult,factor", [((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_latent_shapes_follow_downsampling_factor(ch_mult, factor):
    vae = KLAutoencoder(ch=8, ch_mult=ch_mult, num_res_blocks=1, resolution=32, z_channels=4, norm_groups=4)
    x = torch.randn(2, 3, 32, 48)
    posterior = vae.encode(x)
    assert vae.downsampling_factor == factor
    assert posterior.mean.shape == (2, 4, 32 // factor, 48 // factor)
    assert vae.decode(posterior.sample()).shape == x.shape


def test_attention_resolutions_add_attention_blocks():
    plain = KLAutoencoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_groups=4)
    with_attn = KLAutoencoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(8,), norm_groups=4)
    assert len(plain.encoder.down[1].attn) == 0
    assert len(with_attn.encoder.down[1].attn) == 1 and len(with_attn.encoder.down[0].attn) == 0
    assert len(with_attn.decoder.up[1].attn) == 2  # decoder levels have num_res_blocks + 1 blocks


def test_sd_configuration_has_the_parameter_shapes_of_diffusers_sd_vae():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL(**SD_VAE_DIFFUSERS)
    ours = KLAutoencoder()  # the defaults are SD's
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 83_653_863

    def shapes(module):  # diffusers keeps attention projections as Linear, we keep SD's 1x1 convs
        return sorted(tuple(s for s in p.shape if s != 1) for p in module.parameters())

    assert shapes(ours) == shapes(ref)


def test_posterior_mode_sample_and_kl():
    mean = torch.randn(3, 4, 5, 5)
    logvar = torch.full_like(mean, math.log(0.25))
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mode(), mean)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g1), post.sample(g2))
    samples = torch.stack([post.sample() for _ in range(2000)])
    assert torch.allclose(samples.mean(0), mean, atol=0.05)
    assert torch.allclose(samples.std(0), torch.full_like(mean, 0.5), atol=0.05)
    expected_kl = 0.5 * (mean.pow(2) + 0.25 - 1 - math.log(0.25)).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), expected_kl, rtol=1e-5)
    standard = DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3))
    assert torch.allclose(standard.kl(), torch.zeros(2))


def test_posterior_sample_is_differentiable():
    moments = torch.randn(1, 8, 2, 2, requires_grad=True)
    DiagonalGaussianDistribution(moments).sample().sum().backward()
    assert moments.grad is not None and moments.grad.abs().sum() > 0


def test_attention_block_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(8, norm_groups=4)
    x = torch.randn(2, 8, 4, 3)
    h = block.norm(x)
    q, k, v = (p(h).flatten(2) for p in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (B, N, N)
    out = (v @ weights.transpose(1, 2)).reshape_as(x)
    expected = x + block.proj_out(out)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_patchgan_outputs_a_patch_logit_map():
    disc = NLayerDiscriminator(3, ndf=8, n_layers=3)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    assert F.mse_loss(disc(torch.randn(2, 3, 64, 64)), logits) > 0
