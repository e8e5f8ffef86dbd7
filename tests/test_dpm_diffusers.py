"""solver="dpmpp_2m" against diffusers' own DPMSolverMultistepScheduler loop, with the options
Schedule.from_diffusers_config reads from its config: an analytic smooth model, tiny UNets,
guided, and the captured loop's own code (cuda_graph="emulate"). Skipped without diffusers."""

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule

from .conftest import max_err, requires_triton_interpreter

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddim-fast[diffusers])")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from .test_diffusers import _unet2d, _unet2d_condition  # noqa: E402

SAMPLERS = [
    pytest.param(ReferenceSampler, {}, id="reference"),
    pytest.param(FastSampler, {}, id="fast"),
    pytest.param(FastSampler, {"cuda_graph": "emulate"}, id="emulated", marks=requires_triton_interpreter),
]
CONFIGS = [
    pytest.param({}, id="defaults"),  # linspace spacing, final sigma zero
    pytest.param({"timestep_spacing": "leading", "steps_offset": 1}, id="leading"),
    pytest.param({"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, id="trailing-sigma_min"),
    pytest.param({"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, id="v-scaled_linear"),
    pytest.param({"prediction_type": "sample"}, id="x0"),
]


def _smooth_model(x, t):
    tt = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) / 1000
    return 0.7 * torch.sin(x * (1 + tt)) + 0.1 * tt * torch.cos(3 * x)


def _diffusers_loop(model, scheduler, x, steps, guided=None):
    """diffusers' pipelines' loop around DPMSolverMultistepScheduler.step; guided = (w, cond,
    uncond, rescale): one call on [x, x] with [uncond, cond], ε_u + w (ε_c − ε_u), then
    rescale_noise_cfg when rescale > 0."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        with torch.no_grad():
            if guided is None:
                out = model(x, t.expand(x.shape[0]))
            else:
                w, cond, uncond, rescale = guided
                both = model(torch.cat([x, x]), t, **{k: torch.cat([uncond[k], cond[k]]) for k in cond})
                eps_u, eps_c = getattr(both, "sample", both).chunk(2)
                out = eps_u + w * (eps_c - eps_u)
                if rescale:
                    out = rescale_noise_cfg(out, eps_c, guidance_rescale=rescale)
        x = scheduler.step(getattr(out, "sample", out), t, x).prev_sample
    return x


def _close(got, expected):
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item()), max_err(got, expected)


@pytest.mark.parametrize("cls, engine", SAMPLERS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [10, 25])
def test_analytic_model_matches_diffusers_dpm_solver_loop(cls, engine, config, steps):
    scheduler = DPMSolverMultistepScheduler(**config)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_loop(_smooth_model, scheduler, x_T.clone(), steps)
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    assert options["solver"] == "dpmpp_2m"
    sampler = cls(_smooth_model, schedule, steps=steps, **options, **engine)
    assert sampler.timesteps == scheduler.timesteps.tolist()
    _close(sampler.sample(x_T), expected)


@pytest.mark.parametrize("cls, engine", SAMPLERS)
@pytest.mark.parametrize("steps", [10, 25])
def test_tiny_unet2d_matches_diffusers_dpm_solver_loop(cls, engine, steps):
    unet = _unet2d()
    scheduler = DPMSolverMultistepScheduler()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_loop(unet, scheduler, x_T.clone(), steps)
    schedule, options = Schedule.from_diffusers_config(scheduler)  # the scheduler object itself
    _close(cls(unet, schedule, steps=steps, **options, **engine).sample(x_T), expected)


@pytest.mark.parametrize("cls, engine", SAMPLERS)
@pytest.mark.parametrize("steps, rescale", [(10, 0.0), (25, 0.0), (10, 0.7)])
def test_guided_unet2dcondition_matches_diffusers_dpm_solver_loop(cls, engine, steps, rescale):
    unet = _unet2d_condition()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))}
    uncond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))}
    expected = _diffusers_loop(unet, scheduler, x_T.clone(), steps, guided=(7.5, cond, uncond, rescale))
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    sampler = cls(unet, schedule, steps=steps, **options, **engine)
    got = sampler.sample(x_T, model_kwargs=cond, guidance_scale=7.5, uncond_kwargs=uncond, guidance_rescale=rescale or None)
    _close(got, expected)


@pytest.mark.parametrize("variant, name", [
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
    ({"solver_order": 3}, "solver_order"),
    ({"solver_order": 1}, "solver_order"),
    ({"solver_type": "heun"}, "solver_type"),
    ({"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}, "use_karras_sigmas"),
    ({"thresholding": True}, "thresholding"),
    ({"lower_order_final": False, "final_sigmas_type": "sigma_min"}, "lower_order_final"),
    ({"euler_at_final": True, "final_sigmas_type": "sigma_min"}, "euler_at_final"),
    ({"lambda_min_clipped": -4.0}, "lambda_min_clipped"),
    ({"variance_type": "learned_range"}, "variance_type"),
])
def test_dpm_solver_variants_we_do_not_compute_are_refused_by_name(variant, name):
    scheduler = DPMSolverMultistepScheduler(**variant)
    for given in (scheduler, scheduler.config, dict(scheduler.config)):
        with pytest.raises(ValueError, match=name):
            Schedule.from_diffusers_config(given)


@pytest.mark.parametrize("same", [
    {"lower_order_final": False},  # landing on σ = 0 the last step is first order anyway
    {"euler_at_final": True},
    {"lambda_min_clipped": -5.1},  # below every λ of the linear schedule (-5.07 at t = T - 1): clips nothing
])
def test_dpm_options_that_change_nothing_here_are_taken(same):
    scheduler = DPMSolverMultistepScheduler(**same)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_loop(_smooth_model, scheduler, x_T.clone(), 10)
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    _close(FastSampler(_smooth_model, schedule, steps=10, **options).sample(x_T), expected)


def test_other_schedulers_are_still_refused():
    from diffusers import HeunDiscreteScheduler, UniPCMultistepScheduler

    for scheduler in (HeunDiscreteScheduler(), UniPCMultistepScheduler()):
        with pytest.raises(ValueError, match=f"the {type(scheduler).__name__} config describes a sampler ddim-fast does not run"):
            Schedule.from_diffusers_config(scheduler)
