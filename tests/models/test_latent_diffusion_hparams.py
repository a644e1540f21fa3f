"""LatentDiffusion's grouped settings: typed on the module, plain dicts in checkpoints, and checkpoints written with the
older flat hyper-parameters still read the same."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, tiny_ldm_kwargs
from ldm.formats.lightning_ckpt import read_lightning_checkpoint
from ldm.formats.load import load_components
from ldm.models import LatentDiffusion
from ldm.models.latent_diffusion_config import ObjectiveConfig, OptimizerConfig, ValidationConfig
from ldm.nn.configs import TextEncoderConfig

GROUPS = ("objective", "optimizer", "validation")


def _weights_only_round_trip(ckpt: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_groups_are_typed_on_the_module_and_plain_dicts_in_hparams(ldm_assets):
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, objective=ObjectiveConfig(schedule="linear", num_timesteps=500),
                                              validation={"prompts": ["image 1"], "steps": 2}))
    assert model.objective == ObjectiveConfig(schedule="linear", num_timesteps=500)
    assert model.optimizer_config == OptimizerConfig(learning_rate=1e-3)
    assert model.validation == ValidationConfig(prompts=("image 1",), steps=2)
    assert model.schedule.num_timesteps == 500
    h = model.hparams
    assert h["objective"]["schedule"] == "linear" and h["validation"]["prompts"] == ["image 1"]
    assert h["text_encoder_config"] == TextEncoderConfig(**TINY_TEXT).to_dict()
    assert all(type(h[name]) is dict for name in (*GROUPS, "text_encoder_config"))


def test_checkpoints_with_flat_hparams_read_like_grouped_ones(ldm_assets):
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, objective={"schedule": "linear", "num_timesteps": 500}))
    grouped = dict(model.hparams)
    # The hyper-parameters a checkpoint held before the grouping: every field at the top level.
    flat = {k: v for k, v in grouped.items() if k not in GROUPS}
    flat.update(grouped["objective"], **grouped["optimizer"], **{f"val_{k}": v for k, v in grouped["validation"].items()})
    flat["text_encoder_config"] = dict(TINY_TEXT)
    state = model.state_dict()
    for hparams in (grouped, flat):
        ckpt = _weights_only_round_trip({"hyper_parameters": hparams, "state_dict": state})
        parts = read_lightning_checkpoint(Path("run.ckpt"), ckpt, load_components)
        assert parts.schedule.kind == "linear" and parts.schedule.num_timesteps == 500
        torch.testing.assert_close(parts.schedule.alphas_cumprod, model.schedule.alphas_cumprod)
        assert parts.text_encoder.hidden_size == TINY_TEXT["hidden_size"]
        for name, value in parts.unet.state_dict().items():
            torch.testing.assert_close(value, state[f"unet.{name}"])


def test_the_unet_shape_is_typed_and_its_channels_follow_the_vae_and_text_encoder(ldm_assets):
    from ldm.nn.configs import UNetArchitecture

    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets))
    assert isinstance(model.hparams["unet"], dict) and UNetArchitecture.from_dict(model.hparams["unet"]).model_channels == 16
    assert model.unet.config.context_dim == model.text_encoder.hidden_size
    assert model.unet.config.in_channels == model.autoencoder.latent_channels
    with pytest.raises(ValueError, match="channels follow the VAE"):
        LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, unet={**tiny_ldm_kwargs(ldm_assets)["unet"], "context_dim": 8}))


def test_the_text_encoder_gets_its_own_learning_rate(ldm_assets):
    """``optimizer.text_encoder_learning_rate`` (kohya's ``--text_encoder_lr``): the text encoder's trained weights in
    their own AdamW group, everything else at ``learning_rate``; unset, one group as before."""
    def groups(**optimizer):
        model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, optimizer={"learning_rate": 1e-3, **optimizer}))
        opt = model.configure_optimizers()["optimizer"]
        text = {id(p) for p in model.text_encoder.parameters()}
        trained = [p for p in model.parameters() if p.requires_grad]
        assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in trained)
        return [(g["lr"], {id(p) in text for p in g["params"]}) for g in opt.param_groups]

    assert groups() == [(1e-3, {True, False})]
    assert groups(text_encoder_learning_rate=2e-4) == [(1e-3, {False}), (2e-4, {True})]
    with pytest.raises(ValueError, match="text_encoder_learning_rate"):
        OptimizerConfig(text_encoder_learning_rate=-1.0)
