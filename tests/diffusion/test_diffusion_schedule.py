"""Noise schedules against diffusers' DDPMScheduler, plus invariants and config round trips."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.diffusion import NoiseSchedule, make_betas, rescale_zero_terminal_snr

diffusers = pytest.importorskip("diffusers")

CASES = [
    # (our kind, diffusers beta_schedule, beta_start, beta_end)
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("linear", "linear", 0.0001, 0.02),
    ("cosine", "squaredcos_cap_v2", 0.0001, 0.02),
]


@pytest.mark.parametrize("kind,diffusers_name,beta_start,beta_end", CASES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_matches_diffusers(kind: str, diffusers_name: str, beta_start: float, beta_end: float, zero_snr: bool):
    ours = NoiseSchedule(kind, 1000, beta_start, beta_end, zero_terminal_snr=zero_snr)
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=diffusers_name,
        rescale_betas_zero_snr=zero_snr,
    )
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    # Zero-SNR betas near T are 1 - ac[t] / ac[t-1] with ac ~ 1e-5: diffusers' float32 ratio is only good to
    # ~2e-5 relative there, so those get a relative tolerance.
    torch.testing.assert_close(ours.betas, ref.betas.double(), atol=1e-6, rtol=1e-4 if zero_snr else 0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_alphas_cumprod_decreasing_in_unit_interval(kind: str):
    ac = NoiseSchedule(kind).alphas_cumprod
    assert torch.all(ac[1:] < ac[:-1])
    assert torch.all((ac > 0) & (ac < 1))


def test_zero_terminal_snr():
    s = NoiseSchedule(zero_terminal_snr=True)
    assert s.alphas_cumprod[-1] == 0
    assert s.snr(torch.tensor([999]))[0] == 0
    assert s.betas[-1].item() == pytest.approx(1.0)
    # first value is kept
    assert s.alphas_cumprod[0].item() == pytest.approx(NoiseSchedule().alphas_cumprod[0].item(), abs=1e-12)
    # alpha/sigma at the last step are (0, 1)
    a, sg = s.alpha_sigma(torch.tensor([999]))
    assert a.item() == 0 and sg.item() == 1
    assert torch.all(rescale_zero_terminal_snr(make_betas("linear", 10, 0.1, 0.2))[:-1] < 1)


def test_unknown_kind_lists_kinds():
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("quadratic")


def test_alpha_sigma_shapes_and_forward_process():
    s = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    alpha, sigma = s.alpha_sigma(t, ndim=4)
    assert alpha.shape == sigma.shape == (3, 1, 1, 1) and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    torch.testing.assert_close(s.snr(t), (alpha**2 / sigma**2).view(-1))
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(s.add_noise(x0, noise, t), alpha * x0 + sigma * noise)
    assert s.alpha_sigma(t, ndim=3, dtype=torch.float64)[0].shape == (3, 1, 1)
    with pytest.raises(IndexError):
        s.alpha_sigma(torch.tensor([1000]))


def test_alpha_sigma_at_fractional_timesteps():
    s = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    for a, b in zip(s.alpha_sigma(t.float(), ndim=4, fractional=True), s.alpha_sigma(t, ndim=4)):
        assert torch.equal(a, b)  # integer timesteps: exactly the table's values
    alpha, sigma = s.alpha_sigma(torch.tensor([10.25, -3.0, 1200.0]), ndim=2, dtype=torch.float64, fractional=True)
    ac = s.alphas_cumprod
    torch.testing.assert_close(alpha.view(-1) ** 2, torch.stack([0.75 * ac[10] + 0.25 * ac[11], ac[0], ac[-1]]))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert alpha.shape == (3, 1)


def test_config_round_trip():
    s = NoiseSchedule("linear", 500, 0.0002, 0.03, zero_terminal_snr=True)
    cfg = json.loads(json.dumps(s.to_config()))
    s2 = NoiseSchedule.from_config(cfg)
    assert s2.to_config() == s.to_config()
    assert torch.equal(s2.alphas_cumprod, s.alphas_cumprod)


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_diffusers_scheduler_config(kind: str):
    s = NoiseSchedule(kind, zero_terminal_snr=True)
    cfg = json.loads(json.dumps(s.to_diffusers_scheduler_config()))
    ref = diffusers.DDIMScheduler.from_config(cfg)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    back = NoiseSchedule.from_diffusers_scheduler_config(dict(ref.config))
    assert back.to_config() == s.to_config()
