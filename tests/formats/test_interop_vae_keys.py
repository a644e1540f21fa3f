"""VAE key map and config conversion against diffusers' AutoencoderKL (the oracle)."""

from __future__ import annotations

import torch
from interop_helpers import SD_VAE_DIFFUSERS, TINY_VAE_DIFFUSERS, randomize_

from ldm.formats.vae_keys import diffusers_to_ldm_vae, ldm_to_diffusers_vae, vae_config_from_diffusers, vae_config_to_diffusers
from ldm.nn.autoencoder import KLAutoencoder



def test_sd_config_converts_to_our_defaults_and_back():
    config = vae_config_from_diffusers(SD_VAE_DIFFUSERS)
    defaults = KLAutoencoder()
    assert config["ch"] == 128 and config["ch_mult"] == (1, 2, 4, 4) and config["num_res_blocks"] == 2
    assert vae_config_from_diffusers(vae_config_to_diffusers(config)) == config
    assert defaults.latent_channels == config["embed_dim"]


def test_full_size_keys_and_shapes_match_diffusers_on_meta(diffusers):
    config = vae_config_from_diffusers(SD_VAE_DIFFUSERS)
    with torch.device("meta"):
        ours = KLAutoencoder(**config).state_dict()
        reference = diffusers.AutoencoderKL(**SD_VAE_DIFFUSERS).state_dict()
    mapped = ldm_to_diffusers_vae(ours, config)
    assert mapped.keys() == reference.keys()
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    back = diffusers_to_ldm_vae(reference, config)
    assert back.keys() == ours.keys() and all(back[k].shape == ours[k].shape for k in ours)


def test_tiny_encode_decode_match_diffusers_and_round_trip_is_exact(diffusers):
    torch.manual_seed(0)
    reference = randomize_(diffusers.AutoencoderKL(**TINY_VAE_DIFFUSERS), scale=0.2).eval()
    config = vae_config_from_diffusers(dict(reference.config))
    vae = KLAutoencoder(**config).eval()
    vae.load_state_dict(diffusers_to_ldm_vae(reference.state_dict(), config), strict=True)

    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected_moments = reference.encode(x).latent_dist.parameters
        got_moments = vae.quant_conv(vae.encoder(x))
        expected_image, got_image = reference.decode(z).sample, vae.decode(z)
    assert expected_moments.abs().mean() > 0.05 and expected_image.abs().mean() > 0.05
    torch.testing.assert_close(got_moments, expected_moments, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_image, expected_image, atol=1e-5, rtol=1e-5)

    ours_sd = vae.state_dict()
    theirs_sd = ldm_to_diffusers_vae(ours_sd, config)
    assert theirs_sd["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)
    back = diffusers_to_ldm_vae(theirs_sd, config)
    assert back.keys() == ours_sd.keys() and all(torch.equal(back[k], ours_sd[k]) for k in ours_sd)
    rebuilt = diffusers.AutoencoderKL(**vae_config_to_diffusers(config)).eval()
    rebuilt.load_state_dict(theirs_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.decode(z).sample, expected_image, atol=1e-5, rtol=1e-5)


def test_legacy_attention_names_are_read():
    config = vae_config_from_diffusers(TINY_VAE_DIFFUSERS)
    ours = KLAutoencoder(**config).state_dict()
    theirs = ldm_to_diffusers_vae(ours, config)
    legacy = {
        k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.").replace(".to_out.0.", ".proj_attn."): v
        for k, v in theirs.items()
    }
    assert any(".proj_attn." in k for k in legacy)
    back = diffusers_to_ldm_vae(legacy, config)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
