"""Sampler and timestep parity with diffusers' schedulers, driven by the same toy model function.

The default toy model is smooth with an epsilon-like output (|output| ~ |x|), so a trajectory is well
conditioned and fp32 rounding differences (diffusers keeps its schedule in float32, we in float64) stay
~1e-6. ``_sharp_model`` (0.01 * t * sin(x)) gives outputs ~10 at t ~ 1000, which epsilon-prediction divides
by alpha ~ 0.07: its trajectories amplify fp32 rounding by orders of magnitude (diffusers' own float32
and float64 runs differ by ~4e-3 for DPM++ 10 steps), so with it epsilon parity is checked relatively.
"""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import NoiseSchedule, SamplerConfig, sample, sample_ddim, sample_dpmpp_2m, sampling_timesteps

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ATOL = 1e-5


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + 0.1 * (t.float().view(-1, 1, 1, 1) / 1000) * torch.sin(3 * x)


def _sharp_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) * torch.sin(x)


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run_diffusers(scheduler, model, x: torch.Tensor, n: int, **step_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def _schedule(zero_snr: bool = False) -> NoiseSchedule:
    return NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=zero_snr)


# ----- timesteps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing: str, steps_offset: int):
    s = _schedule()
    ddim = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=steps_offset)
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=steps_offset)
    for n in (1, 2, 3, 7, 10, 20, 25, 50, 333, 999):
        ddim.set_timesteps(n)
        dpm.set_timesteps(n)
        ours = sampling_timesteps(s, n, spacing, steps_offset)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, ddim.timesteps), (n, ours, ddim.timesteps)
        assert torch.equal(sampling_timesteps(s, n, spacing, steps_offset, convention="dpmsolver"), dpm.timesteps), n


def test_timesteps_errors():
    s = _schedule()
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            sampling_timesteps(s, bad)
    with pytest.raises(ValueError, match="trailing"):
        sampling_timesteps(s, 10, "uniform")


# ----- DDIM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps_offset,n", [("leading", 1, 10), ("leading", 0, 25), ("trailing", 0, 20)])
def test_ddim_matches_diffusers(prediction_type: str, spacing: str, steps_offset: int, n: int):
    ref = diffusers.DDIMScheduler(
        **SD, clip_sample=False, set_alpha_to_one=True, steps_offset=steps_offset,
        timestep_spacing=spacing, prediction_type=prediction_type,
    )
    x = _x_T()
    expected = _run_diffusers(ref, _model, x, n)
    s = _schedule()
    ours = sample_ddim(_model, x, s, sampling_timesteps(s, n, spacing, steps_offset), prediction_type)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing,steps_offset,n", [("leading", 1, 10), ("leading", 1, 50), ("trailing", 0, 20)])
def test_ddim_final_step_follows_set_alpha_to_one(prediction_type: str, set_alpha_to_one: bool, spacing: str,
                                                  steps_offset: int, n: int):
    """``sample`` takes DDIM's step after the last timestep to ``alphas_cumprod[0]`` (SD, the original DDIMSampler)
    or to 1, as the model's ``SamplerConfig`` says, matching diffusers' ``DDIMScheduler`` with that setting."""
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                                  timestep_spacing=spacing, prediction_type=prediction_type)  # fmt: skip
    x, s = _x_T(), _schedule()
    expected = _run_diffusers(ref, _model, x, n)
    config = SamplerConfig(timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one)
    ours = sample("ddim", _model, x, s, n, prediction_type, config)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # negative control: the other final step is a different result (the difference the setting makes, ~1e-2)
    other = sample("ddim", _model, x, s, n, prediction_type, SamplerConfig(spacing, steps_offset, not set_alpha_to_one))
    assert (other - expected).abs().max() > 100 * ATOL


def test_sampler_config_from_diffusers_uses_diffusers_defaults():
    # A config without the key: DDIMScheduler.from_config would set alpha to one; SD's configs say false.
    assert SamplerConfig.from_diffusers({"_class_name": "DDIMScheduler"}).set_alpha_to_one is True
    sd15 = {"_class_name": "PNDMScheduler", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "beta_schedule": "scaled_linear"}
    config = SamplerConfig.from_diffusers(sd15)
    assert config == SamplerConfig(steps_offset=1, set_alpha_to_one=False)
    dpm = {"final_sigmas_type": "sigma_min", "lower_order_final": False, "euler_at_final": True, "timestep_spacing": "trailing"}
    assert SamplerConfig.from_diffusers(dpm).to_dict() == dict(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True,
                                                             final_sigmas_type="sigma_min", lower_order_final=False,
                                                             euler_at_final=True)
    settings, rest = SamplerConfig.split({"kind": "cosine", "steps_offset": 1})
    assert settings == SamplerConfig(steps_offset=1) and rest == {"kind": "cosine"}


def test_ddim_sharp_model_matches_diffusers():
    x = _x_T()
    s = _schedule()
    ts = sampling_timesteps(s, 10, "leading", 1)
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, steps_offset=1, prediction_type="v_prediction")
    expected = _run_diffusers(ref, _sharp_model, x, 10)
    torch.testing.assert_close(sample_ddim(_sharp_model, x, s, ts, "v"), expected, atol=ATOL, rtol=0)
    # epsilon: ill-conditioned (|x| ~ 40 at the end, see module docstring); agreement relative to the scale
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, steps_offset=1, prediction_type="epsilon")
    expected = _run_diffusers(ref, _sharp_model, x, 10)
    ours = sample_ddim(_sharp_model, x, s, ts, "epsilon")
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_same_noise_as_diffusers(prediction_type: str):
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    x = _x_T()
    expected = _run_diffusers(ref, _model, x, 10, eta=0.5, generator=torch.Generator().manual_seed(42))
    s = _schedule()
    ts = sampling_timesteps(s, 10, "leading", 1)
    ours = sample_ddim(_model, x, s, ts, prediction_type, eta=0.5, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # the noise matters: another seed gives a different sample
    other = sample_ddim(_model, x, s, ts, prediction_type, eta=0.5, generator=torch.Generator().manual_seed(7))
    assert (other - expected).abs().max() > 1e-2


def test_ddim_zero_snr_trailing_v_matches_diffusers():
    ref = diffusers.DDIMScheduler(
        **SD, clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    x = _x_T()
    expected = _run_diffusers(ref, _model, x, 10)
    s = _schedule(zero_snr=True)
    ours = sample_ddim(_model, x, s, sampling_timesteps(s, 10, "trailing"), "v")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_ddim_callback_and_dtype():
    s = _schedule()
    seen: list[tuple[int, int]] = []
    ts = sampling_timesteps(s, 5, "leading", 1)
    out = sample_ddim(_model, _x_T().double(), s, ts, callback=lambda i, t, x: seen.append((i, t)))
    assert out.dtype == torch.float64
    assert seen == [(i, int(t)) for i, t in enumerate(ts)]


# ----- DPM-Solver++ 2M -------------------------------------------------------------------------------


def _dpm(prediction_type: str, **kw) -> "diffusers.DPMSolverMultistepScheduler":
    config = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero")
    return diffusers.DPMSolverMultistepScheduler(**SD, **(config | kw), prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_2m_matches_diffusers(prediction_type: str, n: int, lower_order_final: bool):
    x = _x_T()
    expected = _run_diffusers(_dpm(prediction_type, lower_order_final=lower_order_final), _model, x, n)
    s = _schedule()
    ts = sampling_timesteps(s, n, "linspace", convention="dpmsolver")
    ours = sample_dpmpp_2m(_model, x, s, ts, prediction_type, lower_order_final=lower_order_final)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # negative control: a first-order solver on the same timesteps is far off, so the tolerance has teeth
    first_order = _run_diffusers(_dpm(prediction_type, solver_order=1), _model, x, n)
    assert (first_order - ours).abs().max() > 100 * ATOL


@pytest.mark.parametrize("spacing,steps_offset", [("leading", 1), ("trailing", 0)])
def test_dpmpp_2m_other_spacings_match_diffusers(spacing: str, steps_offset: int):
    x = _x_T(1)
    ref = _dpm("epsilon", timestep_spacing=spacing, steps_offset=steps_offset)
    expected = _run_diffusers(ref, _model, x, 20)
    s = _schedule()
    ts = sampling_timesteps(s, 20, spacing, steps_offset, convention="dpmsolver")
    torch.testing.assert_close(sample_dpmpp_2m(_model, x, s, ts), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("lower_order_final,euler_at_final", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_final_sigma_min_matches_diffusers(n: int, lower_order_final: bool, euler_at_final: bool, karras: bool):
    """``final_sigmas_type="sigma_min"``: the last step ends at the schedule's smallest sigma, first or second order
    as ``lower_order_final`` (fewer than 15 steps) and ``euler_at_final`` say."""
    settings = dict(final_sigmas_type="sigma_min", lower_order_final=lower_order_final, euler_at_final=euler_at_final)
    ref = _dpm("v_prediction", use_karras_sigmas=karras, timestep_spacing="leading", steps_offset=1, **settings)
    x, s = _x_T(2), _schedule()
    expected = _run_diffusers(ref, _model, x, n)
    config = SamplerConfig(steps_offset=1, **settings)
    ours = sample("dpmpp_2m", _model, x, s, n, "v", config, karras=karras)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # negative controls: ending at sigma zero, or (fewer than 15 steps) a first-order last step, is another result
    to_zero = sample("dpmpp_2m", _model, x, s, n, "v", SamplerConfig(steps_offset=1), karras=karras)
    assert (to_zero - ours).abs().max() > 100 * ATOL
    if n < 15 and not lower_order_final and not euler_at_final and not karras:  # (Karras: the last step is the identity)
        first_order_last = sample("dpmpp_2m", _model, x, s, n, "v", SamplerConfig(steps_offset=1, final_sigmas_type="sigma_min"))
        assert (first_order_last - ours).abs().max() > 100 * ATOL


def test_dpmpp_2m_zero_snr_trailing_v_matches_diffusers():
    x = _x_T()
    ref = _dpm("v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    expected = _run_diffusers(ref, _model, x, 10)
    s = _schedule(zero_snr=True)
    ours = sample_dpmpp_2m(_model, x, s, sampling_timesteps(s, 10, "trailing", convention="dpmsolver"), "v")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dpmpp_2m_sharp_model_matches_diffusers():
    x = _x_T()
    s = _schedule()
    for n in (10, 25):
        ts = sampling_timesteps(s, n, "linspace", convention="dpmsolver")
        ref = _run_diffusers(_dpm("v_prediction"), _sharp_model, x, n)
        torch.testing.assert_close(sample_dpmpp_2m(_sharp_model, x, s, ts, "v"), ref, atol=ATOL, rtol=0)
        # epsilon: ill-conditioned (see module docstring); agreement relative to the sample's scale
        ref = _run_diffusers(_dpm("epsilon"), _sharp_model, x, n)
        ours = sample_dpmpp_2m(_sharp_model, x, s, ts, "epsilon")
        assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_dpmpp_2m_float64_close_to_float32():
    s = _schedule()
    ts = sampling_timesteps(s, 10, "linspace", convention="dpmsolver")
    x = _x_T()
    out32 = sample_dpmpp_2m(_model, x, s, ts)
    out64 = sample_dpmpp_2m(_model, x.double(), s, ts)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, atol=ATOL, rtol=0)
