"""Prediction-type conversions, loss weighting and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import (
    PREDICTION_TYPES,
    classifier_free_guidance,
    eps_from_output,
    loss_weights,
    normalize_prediction_type,
    offset_noise,
    training_target,
    v_from_x0_eps,
    x0_from_output,
)


def _alpha_sigma(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64) * 1.4 + 0.05  # avoid alpha, sigma ~ 0
    return angle.cos(), angle.sin()


def test_aliases():
    assert normalize_prediction_type("eps") == "epsilon"
    assert normalize_prediction_type("v") == "v_prediction"
    assert all(normalize_prediction_type(p) == p for p in PREDICTION_TYPES)
    with pytest.raises(ValueError, match="v_prediction"):
        normalize_prediction_type("sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_round_trip(prediction_type: str):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    alpha, sigma = _alpha_sigma(6, g)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    x_t = alpha * x0 + sigma * eps
    target = training_target(prediction_type, x0, eps, alpha, sigma)
    expected = eps if prediction_type == "epsilon" else v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(target, expected)
    # a perfect model output recovers x0 and eps
    torch.testing.assert_close(x0_from_output(prediction_type, target, x_t, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_output(prediction_type, target, x_t, alpha, sigma), eps)


def test_v_definition():
    x0, eps = torch.tensor([2.0]), torch.tensor([3.0])
    alpha, sigma = torch.tensor([0.6]), torch.tensor([0.8])
    assert v_from_x0_eps(x0, eps, alpha, sigma).item() == pytest.approx(0.6 * 3 - 0.8 * 2)


def test_min_snr_values():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(loss_weights("min_snr", snr, "epsilon", gamma=5.0), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(
        loss_weights("min_snr", snr, "v", gamma=5.0), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0])
    )
    torch.testing.assert_close(loss_weights("uniform", snr, "eps"), torch.ones(3))
    with pytest.raises(ValueError, match="min_snr"):
        loss_weights("p2", snr, "eps")


def test_min_snr_zero_snr_has_no_nan():
    snr = torch.tensor([0.0, 1.0])
    w_v = loss_weights("min_snr", snr, "v_prediction")
    w_eps = loss_weights("min_snr", snr, "epsilon")
    assert torch.isfinite(w_v).all() and torch.isfinite(w_eps).all()
    assert w_v[0] == 0 and w_eps[0] == 1


def test_offset_noise():
    noise = torch.zeros(2, 3, 5, 5)
    out = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    expected = 0.1 * torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected.expand(2, 3, 5, 5))
    assert offset_noise(noise, 0.0) is noise


def test_cfg():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond))
    rescaled = classifier_free_guidance(cond, uncond, 7.5, guidance_rescale=1.0)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    half = classifier_free_guidance(cond, uncond, 7.5, guidance_rescale=0.5)
    torch.testing.assert_close(half, 0.5 * rescaled + 0.5 * classifier_free_guidance(cond, uncond, 7.5))


def test_cfg_matches_diffusers():
    diffusers_sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    guided = uncond + 5.0 * (cond - uncond)
    ref = diffusers_sd.rescale_noise_cfg(guided, cond, guidance_rescale=0.7)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 5.0, 0.7), ref)
