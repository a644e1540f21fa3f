"""Parity of DDPM, Euler, Euler-ancestral, Heun (and Karras DPM++ 2M) with diffusers' schedulers, and the
``sample`` / ``noise_to_step`` entry points, driven by the well-conditioned toy model of test_diffusion_samplers.

diffusers keeps its schedule in float32 and we in float64, so agreement is to ~1e-6; ATOL = 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    SamplerConfig,
    noise_to_step,
    sample,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sampler_timesteps,
    sampling_timesteps,
)

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ATOL = 1e-5
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + 0.1 * (t.float().view(-1, 1, 1, 1) / 1000) * torch.sin(3 * x)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _schedule(zero_snr: bool = False) -> NoiseSchedule:
    return NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=zero_snr)


def _gen(seed: int = 42) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(scheduler, x: torch.Tensor, n: int, start_step: int = 0, x0: torch.Tensor | None = None, **step_kw) -> torch.Tensor:
    """A diffusers pipeline loop: text-to-image from noise ``x``, or img2img from ``add_noise(x0, x, t_start)``."""
    if isinstance(scheduler, (diffusers.HeunDiscreteScheduler, diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler)):
        step_kw.pop("generator", None)  # deterministic schedulers without a generator argument
    scheduler.set_timesteps(n)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start_step * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_step * order)
    if x0 is None:
        sample = x * scheduler.init_noise_sigma
    else:
        sample = scheduler.add_noise(x0, x, timesteps[:1].repeat(x.shape[0]))
    for t in timesteps:
        model_in = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(_model(model_in, t.expand(x.shape[0])), t, sample, **step_kw).prev_sample
    return sample


def _euler(pt: str, spacing: str, offset: int = 0, karras: bool = False, **kw):
    return diffusers.EulerDiscreteScheduler(
        **SD, prediction_type=pt, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras, **kw
    )


def _heun(pt: str, spacing: str, offset: int = 0, karras: bool = False):
    return diffusers.HeunDiscreteScheduler(
        **SD, prediction_type=pt, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras
    )


def _euler_a(pt: str, spacing: str, offset: int = 0, karras: bool = False, n: int = 10, **kw):
    ref = diffusers.EulerAncestralDiscreteScheduler(
        **SD, prediction_type=pt, timestep_spacing=spacing, steps_offset=offset, **kw
    )
    if karras:  # diffusers' Euler-a has no Karras option: give it the Euler scheduler's Karras sigmas/timesteps
        ref.set_timesteps(n)
        src = _euler(pt, spacing, offset, karras=True)
        src.set_timesteps(n)
        ref.set_timesteps = lambda _n: (setattr(ref, "sigmas", src.sigmas.clone()),
                                         setattr(ref, "timesteps", src.timesteps.clone()))
    return ref


def _dpm(pt: str, spacing: str = "linspace", offset: int = 0, karras: bool = False):
    return diffusers.DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
        prediction_type=pt, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras,
    )


# ----- timesteps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,offset", SPACINGS)
def test_timestep_layouts_match_diffusers(spacing: str, offset: int):
    s = _schedule()
    for n in (1, 7, 10, 25, 30, 999):
        ddpm = diffusers.DDPMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        ddpm.set_timesteps(n)
        assert torch.equal(sampling_timesteps(s, n, spacing, offset), ddpm.timesteps), n
        ref = _euler("epsilon", spacing, offset)
        ref.set_timesteps(n)
        ours = sampling_timesteps(s, n, spacing, offset, convention="euler")
        assert ours.dtype == torch.float32
        assert torch.equal(ours, ref.timesteps), (n, ours, ref.timesteps)
        for name in ("euler", "euler_a", "heun"):
            assert torch.equal(sampler_timesteps(name, s, n, spacing, offset), ref.timesteps)


# ----- DDPM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pt", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
def test_ddpm_matches_diffusers(pt: str, n: int, spacing: str, offset: int):
    ref = diffusers.DDPMScheduler(
        **SD, prediction_type=pt, variance_type="fixed_small", clip_sample=False, timestep_spacing=spacing,
        steps_offset=offset,
    )
    x = _x()
    expected = _run(ref, x, n, generator=_gen())
    s = _schedule()
    ts = sampling_timesteps(s, n, spacing, offset)
    ours = sample_ddpm(_model, x, s, ts, pt, generator=_gen())
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    other = sample_ddpm(_model, x, s, ts, pt, generator=_gen(7))
    assert (other - expected).abs().max() > 1e-2  # the noise matters


def test_ddpm_zero_snr_trailing_v_matches_diffusers():
    ref = diffusers.DDPMScheduler(
        **SD, prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True
    )
    x = _x()
    expected = _run(ref, x, 10, generator=_gen())
    s = _schedule(zero_snr=True)
    ours = sample_ddpm(_model, x, s, sampling_timesteps(s, 10, "trailing"), "v", generator=_gen())
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


# ----- Euler, Euler-a, Heun --------------------------------------------------------------------------


@pytest.mark.parametrize("pt", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_euler_family_matches_diffusers(pt: str, n: int, spacing: str, offset: int, karras: bool):
    x, s = _x(), _schedule()
    ts = sampling_timesteps(s, n, spacing, offset, convention="euler")
    kw = dict(use_karras_sigmas=karras, spacing=spacing)

    expected = _run(_euler(pt, spacing, offset, karras), x, n)
    torch.testing.assert_close(sample_euler(_model, x, s, ts, pt, **kw), expected, atol=ATOL, rtol=0)

    expected = _run(_heun(pt, spacing, offset, karras), x, n)
    torch.testing.assert_close(sample_heun(_model, x, s, ts, pt, **kw), expected, atol=ATOL, rtol=0)

    expected = _run(_euler_a(pt, spacing, offset, karras, n), x, n, generator=_gen())
    ours = sample_euler_ancestral(_model, x, s, ts, pt, generator=_gen(), **kw)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    other = sample_euler_ancestral(_model, x, s, ts, pt, generator=_gen(7), **kw)
    assert (other - expected).abs().max() > 1e-2


@pytest.mark.parametrize("karras", [False, True])
def test_euler_final_sigma_min_matches_diffusers(karras: bool):
    """``final_sigmas_type="sigma_min"``: Euler's last step ends at the smallest sigma, returned in sigma space."""
    x, s, n = _x(), _schedule(), 10
    expected = _run(_euler("epsilon", "leading", 1, karras, final_sigmas_type="sigma_min"), x, n)
    config = SamplerConfig(steps_offset=1, final_sigmas_type="sigma_min")
    ours = sample("euler", _model, x, s, n, "epsilon", config, karras=karras)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert (sample("euler", _model, x, s, n, "epsilon", SamplerConfig(steps_offset=1), karras=karras) - ours).abs().max() > 100 * ATOL


def test_karras_changes_the_result():
    # negative control: the Karras option is not a no-op at the tolerance used above
    x, s = _x(), _schedule()
    ts = sampling_timesteps(s, 10, "leading", 1, convention="euler")
    for fn in (sample_euler, sample_heun):
        assert (fn(_model, x, s, ts) - fn(_model, x, s, ts, use_karras_sigmas=True)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_euler_zero_snr_trailing_v_matches_diffusers(name: str):
    x = _x()
    if name == "euler":
        expected = _run(_euler("v_prediction", "trailing", rescale_betas_zero_snr=True), x, 10)
    else:
        ref = _euler_a("v_prediction", "trailing", rescale_betas_zero_snr=True)
        expected = _run(ref, x, 10, generator=_gen())
    s = _schedule(zero_snr=True)
    ours = sample(name, _model, x, s, 10, "v", SamplerConfig(timestep_spacing="trailing"), generator=_gen())
    assert torch.isfinite(ours).all()
    # The first sigma is 4096 (alphas_cumprod floored at 2**-24): the sample starts at |x| ~ 1e4, so float32
    # cancellation in the first step leaves ~2e-5 rounding noise in either implementation; hence 5e-5 here.
    torch.testing.assert_close(ours, expected, atol=5 * ATOL, rtol=0)


def test_euler_denoiser_sees_diffusers_inputs():
    """Float32 (fractional) timesteps and the VP-scaled sample, as diffusers passes them."""
    x, s, n = _x(), _schedule(), 25
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(x_in, t):
        seen.append((x_in.clone(), t.clone()))
        return _model(x_in, t)

    sample("heun", recording, x, s, n, config=SamplerConfig(timestep_spacing="linspace"))
    ref = _heun("epsilon", "linspace")
    ref.set_timesteps(n)
    assert len(seen) == len(ref.timesteps) == 2 * n - 1
    for (_, t), t_ref in zip(seen, ref.timesteps):
        assert t.dtype == torch.float32 and t.shape == (2,)
        assert torch.equal(t, t_ref.expand(2))
    assert any(float(t[0]) != round(float(t[0])) for _, t in seen)  # fractional timesteps do occur
    first_in = ref.scale_model_input(x * ref.init_noise_sigma, ref.timesteps[0])
    torch.testing.assert_close(seen[0][0], first_in, atol=1e-6, rtol=0)


# ----- DPM++ 2M with Karras sigmas -------------------------------------------------------------------


@pytest.mark.parametrize("pt", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_dpmpp_2m_karras_matches_diffusers(pt: str, n: int, spacing: str, offset: int):
    x, s = _x(), _schedule()
    expected = _run(_dpm(pt, spacing, offset, karras=True), x, n)
    ts = sampling_timesteps(s, n, spacing, offset, convention="dpmsolver")
    ours = sample_dpmpp_2m(_model, x, s, ts, pt, use_karras_sigmas=True)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    plain = sample_dpmpp_2m(_model, x, s, ts, pt)
    assert (plain - ours).abs().max() > 100 * ATOL


# ----- sample() / noise_to_step() --------------------------------------------------------------------


# sample_ddim steps to the next listed timestep; diffusers' DDIM steps to t - T // n, which differs for linspace
# spacing (999 -> 899 while the next model call is at 888; see sample_ddim's docstring). Not compared there.
_DDIM_LINSPACE = "ddim steps to the next listed timestep, diffusers' DDIM to t - T // n"


def _reference(name: str, pt: str, spacing: str, karras: bool, n: int):
    if name == "ddim":  # SamplerConfig's default, as SD's configs: the last step goes to alphas_cumprod[0]
        return diffusers.DDIMScheduler(**SD, clip_sample=False, prediction_type=pt, timestep_spacing=spacing, set_alpha_to_one=False)
    if name == "ddpm":
        return diffusers.DDPMScheduler(**SD, clip_sample=False, prediction_type=pt, timestep_spacing=spacing)
    if name == "dpmpp_2m":
        return _dpm(pt, spacing, karras=karras)
    if name == "euler":
        return _euler(pt, spacing, karras=karras)
    if name == "heun":
        return _heun(pt, spacing, karras=karras)
    return _euler_a(pt, spacing, karras=karras, n=n)


# (ddim, linspace) is left out on purpose: _DDIM_LINSPACE explains the deliberate difference.
_HELPER_CASES = [(n, sp) for n in SAMPLERS for sp in ("leading", "trailing", "linspace") if (n, sp) != ("ddim", "linspace")]


@pytest.mark.parametrize("name,spacing", _HELPER_CASES)
def test_sample_helper_text_to_image(name: str, spacing: str):
    x, s, n = _x(), _schedule(), 10
    expected = _run(_reference(name, "v_prediction", spacing, False, n), x, n, generator=_gen())
    ours = sample(name, _model, x, s, n, "v", SamplerConfig(timestep_spacing=spacing), generator=_gen())
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


_IMG2IMG_SAMPLERS = [("ddim", False), ("dpmpp_2m", False), ("dpmpp_2m", True), ("euler", False), ("euler", True),
                     ("euler_a", False), ("heun", False), ("heun", True), ("ddpm", False)]
# (ddim, linspace) is left out on purpose: _DDIM_LINSPACE explains the deliberate difference.
_IMG2IMG_CASES = [(n, k, sp) for n, k in _IMG2IMG_SAMPLERS for sp in ("leading", "trailing", "linspace") if (n, sp) != ("ddim", "linspace")]


@pytest.mark.parametrize("name,karras,spacing", _IMG2IMG_CASES)
@pytest.mark.parametrize("pt", PREDICTIONS)
def test_sample_helper_img2img_matches_diffusers(name: str, karras: bool, spacing: str, pt: str):
    n, start = 10, 4
    x0, noise, s = _x(1), _x(2), _schedule()
    expected = _run(_reference(name, pt, spacing, karras, n), noise, n, start_step=start, x0=x0, generator=_gen())
    config = SamplerConfig(timestep_spacing=spacing)
    x_start = noise_to_step(name, x0, noise, s, n, start, config, karras)
    steps: list[int] = []
    ours = sample(name, _model, x_start, s, n, pt, config, karras=karras, generator=_gen(),
                  start_step=start, callback=lambda i, t, x: steps.append(i))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert steps == list(range(start, n))
    # negative control: starting from the full-noise schedule gives something else
    assert (sample(name, _model, noise, s, n, pt, config, karras=karras, generator=_gen()) - ours).abs().max() > 1e-2


def test_sample_helper_errors():
    s, x = _schedule(), _x()
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m, euler, euler_a, heun"):
        sample("plms", _model, x, s, 10)
    with pytest.raises(ValueError, match="euler_a"):
        noise_to_step("lms", x, x, s, 10, 2)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_steps"):
            sample("euler", _model, x, s, bad)
        with pytest.raises(ValueError, match="num_steps"):
            noise_to_step("ddim", x, x, s, bad, 0)
    with pytest.raises(ValueError, match="start_step"):
        sample("ddim", _model, x, s, 10, start_step=10)
    with pytest.raises(ValueError, match="start_step"):
        sample_euler(_model, x, s, sampling_timesteps(s, 5, convention="euler"), start_step=-1)
    with pytest.raises(ValueError, match="Karras"):
        sample("ddim", _model, x, s, 10, karras=True)
    with pytest.raises(ValueError, match="eta"):
        sample("euler", _model, x, s, 10, eta=0.5)
    with pytest.raises(ValueError, match="spacing"):
        SamplerConfig(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        SamplerConfig(final_sigmas_type="last")


def test_callbacks_and_dtype():
    s = _schedule()
    for name in SAMPLERS:
        seen: list[int] = []
        out = sample(name, _model, _x().double(), s, 5, generator=_gen(), callback=lambda i, t, x: seen.append(i))
        assert out.dtype == torch.float64, name
        assert seen == list(range(5)), name
