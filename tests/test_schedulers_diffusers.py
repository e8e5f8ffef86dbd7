"""The schedulers Stable Diffusion users run, against diffusers' own loops: Euler, Euler
ancestral, DPM-Solver++(2M) with Karras sigmas, LCM. Their noise levels and timesteps against
set_timesteps; the samplers with the options Schedule.from_diffusers_config reads against
diffusers' loop around scheduler.step (an analytic model, a tiny UNet2DModel, a guided
UNet2DConditionModel; the eager loop and the captured loop's own code); the options they do
not compute refused by name. Skipped without diffusers.

diffusers' Euler schedulers keep the sample in the variance-exploding frame x̃ = x sqrt(1 + σ²)
(their latents start as z · init_noise_sigma); our samplers keep x, the model's input: the
tests convert at the two ends as accelerate(pipe) does."""

import math

import numpy as np
import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule
from ddim_fast.core.levels import sigma_of_alpha

from .conftest import max_err, requires_triton_interpreter

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddim-fast[diffusers])")
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler  # noqa: E402

from .test_diffusers import _unet2d, _unet2d_condition  # noqa: E402

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SAMPLERS = [
    pytest.param(ReferenceSampler, {}, id="reference"),
    pytest.param(FastSampler, {}, id="fast"),
    pytest.param(FastSampler, {"cuda_graph": "emulate"}, id="emulated", marks=requires_triton_interpreter),
]
# (scheduler class, its config): what users run, and the options around it
CONFIGS = [
    pytest.param(EulerDiscreteScheduler, {}, id="euler"),  # linspace: fractional timesteps
    pytest.param(EulerDiscreteScheduler, dict(SD_BETAS, timestep_spacing="leading", steps_offset=1), id="euler-sd"),
    pytest.param(EulerDiscreteScheduler, dict(use_karras_sigmas=True), id="euler-karras"),
    pytest.param(EulerDiscreteScheduler, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min", prediction_type="v_prediction"), id="euler-v-sigma_min"),
    pytest.param(EulerAncestralDiscreteScheduler, {}, id="euler_a"),
    pytest.param(EulerAncestralDiscreteScheduler, dict(SD_BETAS, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), id="euler_a-sd-v"),
    pytest.param(DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), id="dpm-karras"),
    pytest.param(DPMSolverMultistepScheduler, dict(SD_BETAS, use_karras_sigmas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"), id="dpm-karras-v-sigma_min"),
    pytest.param(LCMScheduler, {}, id="lcm"),
    pytest.param(LCMScheduler, dict(clip_sample=True, prediction_type="sample"), id="lcm-x0-clip"),
]
SIGMA_FRAME = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)


def _smooth_model(x, t):
    tt = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) / 1000
    return 0.7 * torch.sin(x * (1 + tt)) + 0.1 * tt * torch.cos(3 * x)


def _ends(scheduler) -> tuple:
    """(x_T from diffusers' unit noise, the factor from our result to diffusers'): the scheduler's
    init_noise_sigma and, in the σ frame, the conversions to and from it."""
    if not isinstance(scheduler, SIGMA_FRAME):
        return float(scheduler.init_noise_sigma), 1.0
    first, last = float(scheduler.sigmas[0]), float(scheduler.sigmas[-1])
    return float(scheduler.init_noise_sigma) / math.sqrt(1 + first**2), math.sqrt(1 + last**2)


def _diffusers_loop(model, scheduler, z, steps, generator, guided=None):
    """diffusers' pipelines' loop: latents = z · init_noise_sigma, then per timestep the model on
    scale_model_input(latents), guided as the pipelines guide (one call on [x, x] with
    [uncond, cond], ε_u + w (ε_c − ε_u)), and scheduler.step with the generator."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            if guided is None:
                out = model(inp, t.expand(x.shape[0]))
            else:
                w, cond, uncond = guided
                both = model(torch.cat([inp, inp]), t, **{k: torch.cat([uncond[k], cond[k]]) for k in cond})
                eps_u, eps_c = getattr(both, "sample", both).chunk(2)
                out = eps_u + w * (eps_c - eps_u)
        x = scheduler.step(getattr(out, "sample", out), t, x, generator=generator).prev_sample
    return x


def _sample(cls, engine, model, scheduler, z, steps, **call):
    schedule, options = Schedule.from_diffusers_config(scheduler)
    sampler = cls(model, schedule, steps=steps, **options, **engine)
    scheduler.set_timesteps(steps)
    assert sampler.timesteps == scheduler.timesteps.tolist()
    scale_in, scale_out = _ends(scheduler)
    return sampler.sample(z * scale_in, generator=torch.Generator().manual_seed(1), **call) * scale_out


def _close(got, expected):
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item()), max_err(got, expected)


# --- noise levels and timesteps -------------------------------------------------------------------


@pytest.mark.parametrize("cls, config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 10, 20, 25])
def test_levels_and_timesteps_are_set_timesteps_own(cls, config, steps):
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    schedule, options = Schedule.from_diffusers_config(scheduler)
    sampler = ReferenceSampler(_smooth_model, schedule, steps=steps, **options)
    assert sampler.timesteps == scheduler.timesteps.tolist()
    levels = sampler.options.levels
    if cls is LCMScheduler:  # its levels are the training grid's at its timesteps
        expected = scheduler.alphas_cumprod[scheduler.timesteps].double().numpy()
        np.testing.assert_allclose(levels.alphas[:-1], expected, rtol=2e-6)
        return
    sigmas = np.array([sigma_of_alpha(a) for a in levels.alphas])
    expected = scheduler.sigmas.double().numpy()
    np.testing.assert_allclose(sigmas[:-1], expected[:-1], rtol=1e-6)
    # the final level: diffusers' "sigma_min" is sqrt((1 - ᾱ_0) / ᾱ_0) with 1 - ᾱ_0 in float32,
    # 1e-4 off; ours is exact (the step's weight on x there moves by as much, some 1e-6 of x)
    np.testing.assert_allclose(sigmas[-1], expected[-1], rtol=1e-4)


def test_karras_levels_are_equation_5():
    """σ_i^(1/ρ) falls linearly from σ_max^(1/ρ) to σ_min^(1/ρ) (Karras et al. 2022, Eq. 5, ρ = 7),
    between the σ of the training grid's ends; the model's t is where the training σ is σ_i."""
    schedule = Schedule.scaled_linear()
    sampler = ReferenceSampler(_smooth_model, schedule, steps=12, skip="linspace", solver="dpmpp_2m", sigmas="karras")
    levels = sampler.options.levels
    sigmas = np.array([sigma_of_alpha(a) for a in levels.alphas[:-1]])
    train = np.sqrt((1 - schedule.alphas_cumprod64) / schedule.alphas_cumprod64)
    np.testing.assert_allclose(sigmas[[0, -1]], train[[-1, 0]], rtol=1e-4)  # float32 σ, as diffusers: 1 - ᾱ_0 loses digits
    np.testing.assert_allclose(np.diff(sigmas ** (1 / 7)), np.diff(sigmas ** (1 / 7))[0], rtol=1e-5)
    for sigma, t in zip(sigmas, levels.timesteps):
        assert isinstance(t, int) and abs(t - np.interp(np.log(sigma), np.log(train), np.arange(1000))) <= 0.5 + 1e-3


# --- sampling against diffusers' loops ---------------------------------------------------------------


@pytest.mark.parametrize("cls, engine", SAMPLERS)
@pytest.mark.parametrize("scheduler_cls, config", CONFIGS)
@pytest.mark.parametrize("steps", [4, 20])
def test_analytic_model_matches_diffusers_loop(cls, engine, scheduler_cls, config, steps):
    scheduler = scheduler_cls(**config)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_loop(_smooth_model, scheduler, z.clone(), steps, torch.Generator().manual_seed(1))
    _close(_sample(cls, engine, _smooth_model, scheduler, z, steps), expected)


@pytest.mark.parametrize("cls, engine", SAMPLERS)
@pytest.mark.parametrize("scheduler_cls, config", [CONFIGS[1], CONFIGS[5], CONFIGS[6], CONFIGS[8]])
def test_tiny_unet2d_matches_diffusers_loop(cls, engine, scheduler_cls, config):
    unet = _unet2d()
    scheduler = scheduler_cls(**config)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_loop(unet, scheduler, z.clone(), 6, torch.Generator().manual_seed(1))
    _close(_sample(cls, engine, unet, scheduler, z, 6), expected)


@pytest.mark.parametrize("cls, engine", SAMPLERS)
@pytest.mark.parametrize("scheduler_cls, config", [CONFIGS[1], CONFIGS[5], CONFIGS[6], CONFIGS[8]])
def test_guided_unet2dcondition_matches_diffusers_loop(cls, engine, scheduler_cls, config):
    """The model input is scaled and the guidance combined before the step, on the doubled batch."""
    unet = _unet2d_condition()
    scheduler = scheduler_cls(**config)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))}
    uncond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))}
    expected = _diffusers_loop(unet, scheduler, z.clone(), 6, torch.Generator().manual_seed(1), guided=(7.5, cond, uncond))
    got = _sample(cls, engine, unet, scheduler, z, 6, model_kwargs=cond, guidance_scale=7.5, uncond_kwargs=uncond)
    _close(got, expected)


@pytest.mark.parametrize("scheduler_cls, config", [CONFIGS[4], CONFIGS[8]])
def test_a_list_of_generators_draws_each_sample_from_its_own(scheduler_cls, config):
    """diffusers' randn_tensor with a list of generators draws sample i's noise from generator i."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = scheduler_cls(**config)
    scheduler.set_timesteps(5)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    drawn = gens()
    z = randn_tensor((2, 3, 8, 8), generator=drawn)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = _smooth_model(scheduler.scale_model_input(x, t), t.expand(2))
        x = scheduler.step(out, t, x, generator=drawn).prev_sample
    schedule, options = Schedule.from_diffusers_config(scheduler)
    scale_in, scale_out = _ends(scheduler)
    for cls in (ReferenceSampler, FastSampler):
        ours = gens()
        randn_tensor((2, 3, 8, 8), generator=ours)  # past x_T, as the pipelines' prepare_latents leaves them
        got = cls(_smooth_model, schedule, steps=5, **options).sample(z * scale_in, generator=ours) * scale_out
        _close(got, x)


# --- what is refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, variant, name", [
    (EulerDiscreteScheduler, {"interpolation_type": "log_linear"}, "interpolation_type"),
    (EulerDiscreteScheduler, {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    (EulerDiscreteScheduler, {"use_karras_sigmas": True, "sigma_min": 0.1}, "sigma_min"),
    (EulerDiscreteScheduler, {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
    (EulerDiscreteScheduler, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    (EulerAncestralDiscreteScheduler, {"prediction_type": "sample"}, "prediction_type"),
    (EulerAncestralDiscreteScheduler, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    (LCMScheduler, {"original_inference_steps": 25}, "original_inference_steps"),
    (LCMScheduler, {"timestep_scaling": 5.0}, "timestep_scaling"),
    (LCMScheduler, {"thresholding": True}, "thresholding"),
])  # fmt: skip
def test_scheduler_options_we_do_not_compute_are_refused_by_name(cls, variant, name):
    with pytest.raises(ValueError, match=name):
        Schedule.from_diffusers_config(cls(**variant))


def test_options_that_change_nothing_here_are_taken():
    """Euler's sigma_min/sigma_max serve only its Karras, exponential and beta sigmas; LCM's
    timestep_spacing and steps_offset play no part in its grid."""
    for scheduler, steps in ((EulerDiscreteScheduler(sigma_min=0.1, sigma_max=10.0), 8), (LCMScheduler(timestep_spacing="trailing", steps_offset=1), 4)):
        z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        expected = _diffusers_loop(_smooth_model, scheduler, z.clone(), steps, torch.Generator().manual_seed(1))
        _close(_sample(FastSampler, {}, _smooth_model, scheduler, z, steps), expected)
