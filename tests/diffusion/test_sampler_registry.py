"""The sampler registry states facts that the samplers themselves bear out: who draws noise from the generator,
who takes Karras sigmas and eta, and what timesteps each hands the denoiser."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.diffusion import KARRAS_SAMPLERS, SAMPLER_REGISTRY, SAMPLERS, NoiseSchedule, sample, sampler_info

NAMES = list(SAMPLER_REGISTRY)


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + 0.1 * (t.float().view(-1, 1, 1, 1) / 1000) * torch.sin(3 * x)


def _x() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SCHEDULE = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)


def test_registry_views_and_lookup():
    assert all(name == info.name for name, info in SAMPLER_REGISTRY.items())
    assert SAMPLERS == {name: info.function for name, info in SAMPLER_REGISTRY.items()}
    assert set(KARRAS_SAMPLERS) == {name for name, info in SAMPLER_REGISTRY.items() if info.supports_karras}
    assert sampler_info("euler_a") is SAMPLER_REGISTRY["euler_a"]
    with pytest.raises(ValueError, match="dpmpp_2m"):  # the message lists the known names
        sampler_info("plms")
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLER_REGISTRY["ddim"].stochastic = True


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_samplers_and_only_they_use_the_generator(name):
    info = SAMPLER_REGISTRY[name]
    one = sample(name, _model, _x(), SCHEDULE, 5, generator=_gen(1))
    again = sample(name, _model, _x(), SCHEDULE, 5, generator=_gen(1))
    other = sample(name, _model, _x(), SCHEDULE, 5, generator=_gen(2))
    assert torch.equal(one, again)
    assert info.draws_noise() == info.stochastic
    assert (not torch.equal(one, other)) == info.stochastic


@pytest.mark.parametrize("name", NAMES)
def test_eta_only_where_the_registry_says(name):
    info = SAMPLER_REGISTRY[name]
    if not info.takes_eta:
        with pytest.raises(ValueError, match="eta"):
            sample(name, _model, _x(), SCHEDULE, 5, eta=0.5, generator=_gen(1))
        return
    assert info.draws_noise(eta=0.5) and not info.draws_noise(eta=0.0)
    one = sample(name, _model, _x(), SCHEDULE, 5, eta=0.5, generator=_gen(1))
    other = sample(name, _model, _x(), SCHEDULE, 5, eta=0.5, generator=_gen(2))
    assert not torch.equal(one, other)


@pytest.mark.parametrize("name", NAMES)
def test_karras_sigmas_only_where_the_registry_says(name):
    info = SAMPLER_REGISTRY[name]
    if not info.supports_karras:
        with pytest.raises(ValueError, match="Karras"):
            sample(name, _model, _x(), SCHEDULE, 5, karras=True)
        return
    plain = sample(name, _model, _x(), SCHEDULE, 5, generator=_gen(1))
    karras = sample(name, _model, _x(), SCHEDULE, 5, karras=True, generator=_gen(1))
    assert torch.isfinite(karras).all() and not torch.equal(plain, karras)


@pytest.mark.parametrize("name", NAMES)
def test_space_is_the_kind_of_timesteps_the_denoiser_sees(name):
    seen: list[torch.dtype] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.dtype)
        return _model(x, t)

    sample(name, model, _x(), SCHEDULE, 4, generator=_gen(1))
    floating = {dtype.is_floating_point for dtype in seen}
    assert floating == {SAMPLER_REGISTRY[name].space == "sigma"}
    assert SAMPLER_REGISTRY[name].space in ("sigma", "timestep")
