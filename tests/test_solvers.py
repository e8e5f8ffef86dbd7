"""Solvers (core/solvers/): their step plans, the history column of the fused step on every
backend, DPM-Solver++(2M) against its own reference loop and the ODE it solves, and the Euler,
Euler ancestral and LCM steps against the equations they come from.

Parity with diffusers' DPMSolverMultistepScheduler is in test_dpm_diffusers.py, with its
Euler, Euler ancestral, LCM schedulers and Karras sigmas in test_schedulers_diffusers.py.
"""

import math

import numpy as np
import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule, ops
from ddim_fast.core import plan as P
from ddim_fast.core.solvers import SOLVERS, sampling_plan

from .conftest import max_err, requires_triton_interpreter, tiny_unet
from .test_ops import BACKENDS, DTYPES, _close, _inputs, _poison, native_cpu

SCHEDULE = Schedule.linear()


def _lam(a: float) -> float:
    return 0.5 * math.log(a / (1 - a)) if a < 1 else math.inf


# --- plans ----------------------------------------------------------------------------------


def test_solvers_are_named():
    assert SOLVERS == ("ddim", "dpmpp_2m", "euler", "euler_ancestral", "lcm")
    with pytest.raises(ValueError, match="solver must be one of"):
        FastSampler(tiny_unet(), SCHEDULE, steps=4, solver="heun")
    with pytest.raises(ValueError, match="solver must be one of"):
        ReferenceSampler(tiny_unet(), SCHEDULE, steps=4, solver=None)


@pytest.mark.parametrize("steps, final_alpha", [(10, 1.0), (20, 1.0), (20, None), (14, None), (15, None)])
def test_dpmpp_2m_rows_are_lu_et_al_second_order_multistep(steps, final_alpha):
    """Each row against the update written from λ, h and r (Lu et al. 2022, Algorithm 2)."""
    a0 = float(SCHEDULE.alphas_cumprod64[0])
    schedule = Schedule.from_betas(SCHEDULE.betas64, final_alpha_cumprod=a0 if final_alpha is None else final_alpha)
    grid = schedule.timesteps(steps, "dpm_linspace")
    plan = sampling_plan("dpmpp_2m", schedule, grid, 0.0)
    assert plan.solver == "dpmpp_2m" and plan.history and plan.has_xt and plan.noisy_steps == 0
    for i, (s0, t) in enumerate(zip(plan.timesteps, plan.prev)):
        a_s, a_t = schedule.alpha(s0), schedule.alpha(t)
        alpha_t, sigma_t, sigma_s = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(1 - a_s)
        h = _lam(a_t) - _lam(a_s)
        expm1 = -1.0 if math.isinf(h) else math.expm1(-h)  # e^{-h} - 1
        row = plan.coefs[i]
        assert row[P.SQRT_ALPHA_T] == pytest.approx(math.sqrt(a_s)) and row[P.SQRT_ONE_MINUS_ALPHA_T] == pytest.approx(sigma_s)
        assert row[P.C_XT] == pytest.approx(sigma_t / sigma_s, abs=1e-15)
        assert row[P.C_EPS] == 0 and row[P.SIGMA] == 0
        last_first_order = i == steps - 1 and (steps < 15 or a_t == 1.0)
        if i == 0 or last_first_order:
            assert row[P.C_X0] == pytest.approx(-alpha_t * expm1, rel=1e-12)
            assert row[P.C_X0_PREV] == 0
        else:
            r = (_lam(a_s) - _lam(schedule.alpha(plan.timesteps[i - 1]))) / h
            assert row[P.C_X0] == pytest.approx(-alpha_t * expm1 * (1 + 1 / (2 * r)), rel=1e-9)
            assert row[P.C_X0_PREV] == pytest.approx(alpha_t * expm1 / (2 * r), rel=1e-9)
    second_order_last = plan.coefs[-1, P.C_X0_PREV] != 0
    assert second_order_last == (steps >= 15 and final_alpha is None)  # diffusers' lower_order_final


def test_first_order_dpm_solver_pp_is_ddim():
    """DPM-Solver++'s first-order step is DDIM's η = 0 step (Lu et al., Section 4): the first
    row of its plan moves x as DDIM's first row does, for any x and x̂₀."""
    grid = SCHEDULE.timesteps(10)
    ddim = sampling_plan("ddim", SCHEDULE, grid, 0.0)
    dpm = sampling_plan("dpmpp_2m", SCHEDULE, grid, 0.0)
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    for i in (0, 9):
        d, m = ddim.coefs[i], dpm.coefs[i]
        eps = (x - d[P.SQRT_ALPHA_T] * x0) / d[P.SQRT_ONE_MINUS_ALPHA_T]
        via_ddim = d[P.C_X0] * x0 + d[P.C_EPS] * eps
        via_dpm = m[P.C_X0] * x0 + m[P.C_XT] * x
        torch.testing.assert_close(via_dpm, via_ddim, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="eta must be 0"):
        FastSampler(tiny_unet(), SCHEDULE, steps=10, eta=0.5, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="eta must be 0"):
        ReferenceSampler(tiny_unet(), SCHEDULE, steps=10, eta="ddpm_noisy", solver="dpmpp_2m")
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        FastSampler(tiny_unet(), SCHEDULE, steps=10, clip_x0=True, use_clipped_model_output=True, solver="dpmpp_2m")
    # 'quad' repeats small timesteps at large S: h = 0 there, which a multistep solver cannot take
    with pytest.raises(ValueError, match="strictly increasing"):
        FastSampler(tiny_unet(), SCHEDULE, steps=200, skip="quad", solver="dpmpp_2m")


def test_dpm_grids_are_the_s_plus_one_point_grids_less_the_lowest():
    T = 1000
    assert SCHEDULE.timesteps(10, "dpm_linspace") == [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    assert SCHEDULE.timesteps(4, "dpm_leading", steps_offset=1) == [201, 401, 601, 801]
    assert SCHEDULE.timesteps(5, "dpm_linspace") == [int(v) for v in np.linspace(0, T - 1, 6).round()[1:]]
    with pytest.raises(ValueError, match="repeats timesteps"):
        SCHEDULE.timesteps(1000, "dpm_linspace")
    with pytest.raises(ValueError, match="steps_offset applies"):
        SCHEDULE.timesteps(10, "dpm_linspace", steps_offset=1)


# --- the history column of the fused step, every backend ---------------------------------------


def _ref_step_with_history(x, m, row, noise, history, clip, prediction):
    """x_next = c_x0 x̂₀ + c_eps ε + c_xt x + c_x0_prev x̂₀_prev + σ z, in float64, written plainly."""
    x, m, history = x.double(), m.double(), history.double()
    sa, s1m = row[P.SQRT_ALPHA_T], row[P.SQRT_ONE_MINUS_ALPHA_T]
    if prediction == 0:
        x0, eps = (x - s1m * m) / sa, m
    else:  # v
        x0, eps = sa * x - s1m * m, sa * m + s1m * x
    if clip is not None:
        x0 = x0.clamp(*clip)
    out = row[P.C_X0] * x0 + row[P.C_EPS] * eps + row[P.C_XT] * x + row[P.C_X0_PREV] * history
    if noise is not None:
        out = out + row[P.SIGMA] * noise.double()
    return out, x0


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape, channels_last", [((3, 5, 7, 9), False), ((2, 3, 5, 7), True), ((1037,), False)])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("prediction, clip, sigma", [(0, None, 0.0), (2, (-1.5, 1.5), 0.3)])
def test_step_reads_and_rewrites_the_history(backend, device, dtype, atol, rtol, shape, channels_last, guided, prediction, clip, sigma):
    x, m, z = _inputs(shape, dtype, device)
    cond = _inputs(shape, dtype, device, seed=1)[1] if guided else None
    history = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    if channels_last:
        x, m, z, history = (t.contiguous(memory_format=torch.channels_last) for t in (x, m, z, history))
        cond = None if cond is None else cond.contiguous(memory_format=torch.channels_last)
    row = [0.0] * P.NUM_COEFS
    row[P.SQRT_ALPHA_T], row[P.SQRT_ONE_MINUS_ALPHA_T] = math.sqrt(0.3), math.sqrt(0.7)
    row[P.C_X0], row[P.C_EPS], row[P.C_XT], row[P.C_X0_PREV], row[P.SIGMA] = 1.9, 0.2, 0.6, -0.7, sigma
    w = 2.5
    m_combined = m if cond is None else (m.double() + w * (cond.double() - m.double()))
    noise = z if sigma else None
    expected, expected_x0 = _ref_step_with_history(x, m_combined, row, noise, history, clip, prediction)
    out = _poison(torch.empty_like(x))
    kwargs = dict(cond=cond, guidance=w) if guided else {}
    ops.step(x, m, tuple(row), noise, clip, prediction, False, out, None, backend=backend, history=history, **kwargs)
    _close(out, expected, dtype, 4 * atol, 4 * rtol)
    # the history now holds this step's x̂₀ (float32, computed from x's dtype's inputs)
    torch.testing.assert_close(history.double(), expected_x0, atol=1e-5 * (1 + expected_x0.abs().max().item()), rtol=1e-5)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)


@native_cpu
def test_native_step_refuses_a_weight_without_a_history():
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="no history tensor"):
        torch.ops.ddim_fast.ddim_step(x, x, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, False, 0.0, 0.0, 0, False, x.clone(), None, 0.5, None)
    with pytest.raises(RuntimeError, match="history must be float32"):
        torch.ops.ddim_fast.ddim_step(x, x, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, False, 0.0, 0.0, 0, False, x.clone(), None, 0.5, x.half())


# --- DPM-Solver++(2M) sampling --------------------------------------------------------------


def _smooth_model(x, t):
    """An analytic ε-model, smooth in x and t: the solver's order shows in its error."""
    tt = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) / 1000
    return 0.7 * torch.sin(x * (1 + tt)) + 0.1 * tt * torch.cos(3 * x)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_dpmpp_2m_matches_its_reference_loop(steps, channels):
    x_T = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    model = tiny_unet(in_channels=channels)
    ref = ReferenceSampler(model, SCHEDULE, steps=steps, skip="dpm_linspace", solver="dpmpp_2m").sample(x_T)
    fast = FastSampler(model, SCHEDULE, steps=steps, skip="dpm_linspace", solver="dpmpp_2m")  # channels_last by default
    got = fast.sample(x_T)
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())
    out = fast.sample(x_T, return_x0=True)  # the eager loop with x̂₀ out; the history beside it
    assert max_err(out.sample, ref) <= 1e-4 * (1 + ref.abs().max().item()) and len(out.x0_preds) == steps


def test_dpmpp_2m_in_low_precision_tracks_float64():
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ReferenceSampler(_smooth_model, SCHEDULE, steps=10, skip="dpm_linspace", solver="dpmpp_2m").sample(x_T.double())
    for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
        got = FastSampler(_smooth_model, SCHEDULE, steps=10, skip="dpm_linspace", solver="dpmpp_2m", dtype=dtype).sample(x_T)
        assert got.dtype == dtype
        assert max_err(got, ref) <= tol * (1 + ref.abs().max().item()), (dtype, max_err(got, ref))


def test_dpmpp_2m_converges_at_second_order_where_ddim_is_first():
    """Against the ODE's solution (DDIM at S = 1000 from the same x_T), on a smooth model:
    halving the step size roughly halves DDIM's error and quarters DPM-Solver++(2M)'s."""
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ode = ReferenceSampler(_smooth_model, SCHEDULE, steps=1000, skip="trailing").sample(x_T)

    def error(solver, steps):
        return max_err(ReferenceSampler(_smooth_model, SCHEDULE, steps=steps, skip="trailing", solver=solver).sample(x_T), ode)

    ddim_ratio = error("ddim", 20) / error("ddim", 40)
    dpm_ratio = error("dpmpp_2m", 20) / error("dpmpp_2m", 40)
    assert 1.5 < ddim_ratio < 2.6, ddim_ratio
    assert dpm_ratio > 3.0, dpm_ratio


def test_encode_stays_ddim_whatever_the_solver():
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = tiny_unet()
    for cls in (ReferenceSampler, FastSampler):
        via_dpm = cls(model, SCHEDULE, steps=10, solver="dpmpp_2m").encode(x0)
        via_ddim = cls(model, SCHEDULE, steps=10).encode(x0)
        assert max_err(via_dpm, via_ddim) == 0


@requires_triton_interpreter
@pytest.mark.parametrize("graph_mode", ["step", "loop"])
def test_emulated_captured_loop_runs_dpmpp_2m_with_its_history(graph_mode):
    """The captured loop's own code (its static history buffer, zeroed per run) gives the
    reference's samples, twice in a row (a second run does not read the first's history)."""
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = tiny_unet(in_channels=3)
    ref = ReferenceSampler(model, SCHEDULE, steps=6, skip="dpm_linspace", solver="dpmpp_2m").sample(x_T)
    fast = FastSampler(model, SCHEDULE, steps=6, skip="dpm_linspace", solver="dpmpp_2m", cuda_graph="emulate", graph_mode=graph_mode)
    first = fast.sample(x_T)
    second = fast.sample(x_T)
    assert max_err(first, ref) <= 1e-4 * (1 + ref.abs().max().item())
    assert max_err(second, first) == 0
    (loop,) = fast._graphs._entries.values()
    assert loop.history is not None and loop.history.dtype == torch.float32 and loop.spec.solver == "dpmpp_2m"


def test_the_engine_reads_a_spec_fixed_before_the_loop():
    fast = FastSampler(tiny_unet(), SCHEDULE, steps=6, solver="dpmpp_2m", clip_x0=True)
    spec = fast.spec("sampling")
    assert spec is fast.spec("sampling")  # made once
    assert spec.history and spec.clip == (-1.0, 1.0) and not spec.draws_noise and spec.solver == "dpmpp_2m"
    encoding = fast.spec("encoding")
    assert encoding.clip is None and not encoding.history and encoding.solver == "ddim"
    with pytest.raises(Exception):  # frozen
        spec.clip = None


def test_ten_dpmpp_2m_steps_land_at_most_half_as_far_from_the_ode_as_ten_ddim_steps():
    """The embedded digits model: RMS distance to the ODE's solution (DDIM at S = 1000 from the
    same x_T). The grids start at t = T - 1 as S = 1000 does ("trailing"): a grid starting
    lower would start the ODE elsewhere."""
    from ddim_fast.apps.pretrained import load_pretrained, load_schedule

    model, schedule = load_pretrained("digits").eval(), load_schedule("digits")
    x_T = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ode = FastSampler(model, schedule, steps=1000, skip="trailing").sample(x_T)

    def rms(solver):
        sample = FastSampler(model, schedule, steps=10, skip="trailing", solver=solver).sample(x_T)
        return (sample - ode).pow(2).mean().sqrt().item()

    ddim, dpm = rms("ddim"), rms("dpmpp_2m")
    assert dpm <= 0.5 * ddim, (dpm, ddim)


# --- edges --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_a_zero_history_weight_reads_nothing_on_every_backend(backend, device):
    """At the first step the weight is 0: a NaN left in the buffer must not reach x."""
    x, m, _ = _inputs((2, 3, 5, 7), torch.float32, device)
    history = torch.full_like(x, float("nan"))
    row = [0.0] * P.NUM_COEFS
    row[P.SQRT_ALPHA_T], row[P.SQRT_ONE_MINUS_ALPHA_T], row[P.C_X0], row[P.C_XT] = math.sqrt(0.3), math.sqrt(0.7), 0.9, 0.4
    out = _poison(torch.empty_like(x))
    ops.step(x, m, tuple(row), None, None, 0, False, out, None, backend=backend, history=history)
    assert torch.isfinite(out).all() and torch.isfinite(history).all()  # and history holds this x̂₀


def test_a_history_weight_needs_a_history():
    x = torch.zeros(4)
    row = [0.0] * P.NUM_COEFS
    row[P.SQRT_ALPHA_T], row[P.C_X0_PREV] = 1.0, 0.5
    with pytest.raises(ValueError, match="no history"):
        ops.step(x, x, tuple(row), None, None, 0, False, x.clone(), None, backend="torch")


@native_cpu
def test_native_step_refuses_a_history_that_overlaps_its_output():
    x = torch.zeros(4)
    out = torch.zeros(4)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        torch.ops.ddim_fast.ddim_step(x, x.clone(), 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, False, 0.0, 0.0, 0, False, out, None, 0.5, out)


def test_a_last_step_that_lands_where_it_starts_is_an_identity_not_an_error():
    """A grid holding t = 0 with a final ᾱ of ᾱ_0 (set_alpha_to_one=False): h = 0 there."""
    a0 = float(SCHEDULE.alphas_cumprod64[0])
    schedule = Schedule.from_betas(SCHEDULE.betas64, final_alpha_cumprod=a0)
    plan = sampling_plan("dpmpp_2m", schedule, schedule.timesteps(20), 0.0)  # uniform: holds t = 0
    last = plan.coefs[-1]
    assert plan.timesteps[-1] == 0 and last[P.C_XT] == 1.0 and last[P.C_X0_PREV] == 0.0
    assert last[P.C_X0] == pytest.approx(0.0, abs=1e-15)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ReferenceSampler(tiny_unet(), schedule, steps=20, solver="dpmpp_2m").sample(x_T)
    fast = FastSampler(tiny_unet(), schedule, steps=20, solver="dpmpp_2m").sample(x_T)
    assert max_err(fast, ref) <= 1e-4 * (1 + ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_dpmpp_2m_in_low_precision_on_a_grid_holding_t0(dtype):
    """ᾱ_0 = 0.9999 is 1 in fp16: the reference's scalars stay float64."""
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = ReferenceSampler(_smooth_model, SCHEDULE, steps=10, solver="dpmpp_2m").sample(x_T.double())
    low = ReferenceSampler(_smooth_model, SCHEDULE, steps=10, solver="dpmpp_2m").sample(x_T.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert max_err(low, exact) <= 5e-2 * (1 + exact.abs().max().item())


def test_the_spec_tells_plans_apart_by_their_coefficients():
    model = tiny_unet()
    half, full = (FastSampler(model, SCHEDULE, steps=6, eta=eta).spec("sampling") for eta in (0.5, 1.0))
    assert half.noisy == full.noisy and half != full




@requires_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("solver, skip", [("dpmpp_2m", "dpm_linspace"), ("euler_ancestral", "euler_linspace"), ("lcm", "lcm")])
def test_emulated_loop_guided_solvers_in_the_default_layout_track_float64(dtype, solver, skip):
    """The captured loop's own code with users' defaults: channels_last, 3 channels, guided
    (class labels), against the float64 reference: fp32 to rounding, bf16 held to PyTorch's
    own error at that precision (the model cast, in an fp32 loop) plus storing x in bf16."""
    import copy

    from .conftest import CastModel

    model = tiny_unet(in_channels=3, num_classes=10)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    guided = dict(model_kwargs={"class_labels": torch.tensor([3, 7])}, guidance_scale=3.0, uncond_kwargs={"class_labels": torch.full((2,), model.null_label)})
    plan = dict(steps=8, skip=skip, solver=solver)
    exact = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, **plan).sample(x_T.double(), generator=torch.Generator().manual_seed(1), **guided)
    fast = FastSampler(model, SCHEDULE, **plan, cuda_graph="emulate", dtype=dtype)
    got = fast.sample(x_T, generator=torch.Generator().manual_seed(1), **guided)
    assert got.dtype == dtype
    scale = exact.abs().max().item()
    if dtype == torch.float32:
        assert max_err(got, exact) <= 1e-4 * (1 + scale)
    else:
        own = max_err(ReferenceSampler(CastModel(model, dtype), SCHEDULE, **plan).sample(x_T, generator=torch.Generator().manual_seed(1), **guided), exact)
        assert 0 < own and max_err(got, exact) <= 2 * own + torch.finfo(dtype).eps * scale, (max_err(got, exact), own)
    (loop,) = fast._graphs._entries.values()
    assert loop.guide is not None and (loop.history is not None) == (solver == "dpmpp_2m") and loop.x.is_contiguous(memory_format=torch.channels_last)


# --- Euler, Euler ancestral, LCM ----------------------------------------------------------------


def _levels(solver, **options):
    return ReferenceSampler(_smooth_model, SCHEDULE, steps=10, solver=solver, **options).options.levels


def test_euler_is_ddim_on_the_same_levels():
    """Euler's step in σ is DDIM's η = 0 step (and DPM-Solver++'s first order): for any x and
    x̂₀, the rows move x alike, here on interpolated (fractional) levels and Karras ones."""
    from ddim_fast.core.solvers import plan_of_levels

    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    for options in (dict(skip="euler_linspace"), dict(skip="leading", sigmas="karras")):
        levels = _levels("euler", **options)
        euler, ddim = plan_of_levels("euler", levels, 0.0), plan_of_levels("ddim", levels, 0.0)
        assert euler.timesteps == ddim.timesteps and not euler.noisy_steps
        for e, d in zip(euler.coefs, ddim.coefs):
            eps = (x - d[P.SQRT_ALPHA_T] * x0) / d[P.SQRT_ONE_MINUS_ALPHA_T]
            torch.testing.assert_close(e[P.C_X0] * x0 + e[P.C_XT] * x, d[P.C_X0] * x0 + d[P.C_EPS] * eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_euler_ancestral_lands_at_the_next_level_in_distribution(eta):
    """x = α x̂₀ + s ε: the step gives α' x̂₀ + α' σ_down ε + α' σ_up z, whose noise has the
    variance 1 - ᾱ' of the next level (σ_down² + σ_up² = σ'²); η = 0 is Euler's step."""
    from ddim_fast.core.solvers import plan_of_levels

    levels = _levels("euler_ancestral", skip="euler_linspace")
    plan = plan_of_levels("euler_ancestral", levels, eta)
    for i, row in enumerate(plan.coefs):
        a, s = row[P.SQRT_ALPHA_T], row[P.SQRT_ONE_MINUS_ALPHA_T]
        a_next = levels.alphas[i + 1]
        assert row[P.C_X0] + row[P.C_XT] * a == pytest.approx(math.sqrt(a_next), rel=1e-12)
        assert (row[P.C_XT] * s) ** 2 + row[P.SIGMA] ** 2 == pytest.approx(1 - a_next, rel=1e-9, abs=1e-15)
    assert plan.noisy_steps == (0 if eta == 0 else 9)  # not the last step, to σ = 0
    if eta == 0:
        np.testing.assert_allclose(plan.coefs, plan_of_levels("euler", levels, 0.0).coefs, rtol=1e-12, atol=1e-15)


def test_lcm_rows_are_the_consistency_function_noised_to_the_next_timestep():
    from ddim_fast.core.solvers import plan_of_levels

    levels = _levels("lcm", skip="lcm")
    plan = plan_of_levels("lcm", levels, None)
    assert levels.timesteps == (999, 899, 799, 699, 599, 499, 399, 299, 199, 99)
    for i, (t, row) in enumerate(zip(levels.timesteps, plan.coefs)):
        scaled = 10 * t
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
        last = i == len(levels.timesteps) - 1
        noise_to = 1.0 if last else math.sqrt(SCHEDULE.alpha(levels.timesteps[i + 1]))
        assert row[P.C_X0] == pytest.approx(noise_to * c_out, rel=1e-12) and row[P.C_XT] == pytest.approx(noise_to * c_skip, rel=1e-12)
        assert row[P.SIGMA] == (0.0 if last else pytest.approx(math.sqrt(1 - SCHEDULE.alpha(levels.timesteps[i + 1])), rel=1e-12))


def test_each_solver_takes_its_own_eta_and_refuses_others():
    model = tiny_unet()
    assert FastSampler(model, SCHEDULE, steps=4).options.eta == 0.0
    assert FastSampler(model, SCHEDULE, steps=4, solver="euler_ancestral").options.eta == 1.0
    assert ReferenceSampler(model, SCHEDULE, steps=4, solver="euler_ancestral", eta=0.3).options.eta == 0.3
    assert FastSampler(model, SCHEDULE, steps=4, solver="lcm", skip="lcm").options.eta is None
    with pytest.raises(ValueError, match="eta does not apply"):
        FastSampler(model, SCHEDULE, steps=4, solver="lcm", skip="lcm", eta=0.0)
    with pytest.raises(ValueError, match="eta must be 0"):
        FastSampler(model, SCHEDULE, steps=4, solver="euler", eta=0.5)
    with pytest.raises(ValueError, match="not 'ddpm_noisy'"):
        ReferenceSampler(model, SCHEDULE, steps=4, solver="euler_ancestral", eta="ddpm_noisy")
    with pytest.raises(ValueError, match="sigmas='karras' does not apply"):
        FastSampler(model, SCHEDULE, steps=4, sigmas="karras")
    with pytest.raises(ValueError, match="sigmas must be None"):
        FastSampler(model, SCHEDULE, steps=4, solver="euler", sigmas="exponential")
    with pytest.raises(ValueError, match="fractional ones"):
        ReferenceSampler(model, SCHEDULE, steps=5, skip="euler_linspace")
    with pytest.raises(ValueError, match="at most 50"):
        FastSampler(model, SCHEDULE, steps=51, solver="lcm", skip="lcm")
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        FastSampler(model, SCHEDULE, steps=4, solver="euler", clip_x0=True, use_clipped_model_output=True)


class _RecordingModel:
    """An analytic ε-model (a callable, not a module: the samplers run it as it is) that
    records the timesteps it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        return _smooth_model(x, t)


@pytest.mark.parametrize("cls", [ReferenceSampler, FastSampler])
def test_fractional_timesteps_reach_the_model_as_float32(cls):
    """diffusers' Euler schedulers call the model at float32 timesteps; on the integer grid it
    gets int64 ones, as before."""
    model = _RecordingModel()
    sampler = cls(model, SCHEDULE, steps=7, skip="euler_linspace", solver="euler")
    sampler.sample(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    expected = np.linspace(0, 999, 7, dtype=np.float32)[::-1]
    assert [t.dtype for t in model.calls] == [torch.float32] * 7
    assert [t[0].item() for t in model.calls] == expected.tolist() == sampler.timesteps
    assert any(not float(t).is_integer() for t in sampler.timesteps)
    model.calls.clear()
    cls(model, SCHEDULE, steps=7, skip="trailing", solver="euler").sample(torch.randn(2, 3, 4, 4))
    assert {t.dtype for t in model.calls} == {torch.long}


@pytest.mark.parametrize("solver, skip, sigmas", [("euler", "euler_linspace", None), ("euler_ancestral", "leading", "karras"), ("lcm", "lcm", None), ("dpmpp_2m", "linspace", "karras")])
def test_lean_unet_matches_the_reference_on_every_solver(solver, skip, sigmas):
    """The lean UNet's time table at fractional timesteps, the fused step's rows, the noise order."""
    model = tiny_unet(in_channels=3)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    options = dict(steps=6, skip=skip, solver=solver, sigmas=sigmas)
    ref = ReferenceSampler(model, SCHEDULE, **options).sample(x_T, generator=torch.Generator().manual_seed(1))
    got = FastSampler(model, SCHEDULE, **options).sample(x_T, generator=torch.Generator().manual_seed(1))
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())


@requires_triton_interpreter
def test_emulated_loop_takes_fractional_timesteps_into_its_timestep_buffer():
    """A model that does not run from a table reads t_buf, which the advance kernel fills with
    float32 rows of the timestep table."""
    model = _RecordingModel()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = ReferenceSampler(_smooth_model, SCHEDULE, steps=5, skip="euler_linspace", solver="euler_ancestral").sample(x_T, generator=torch.Generator().manual_seed(1))
    fast = FastSampler(model, SCHEDULE, steps=5, skip="euler_linspace", solver="euler_ancestral", cuda_graph="emulate")
    got = fast.sample(x_T, generator=torch.Generator().manual_seed(1))
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())
    assert [t[0].item() for t in model.calls] == fast.timesteps and model.calls[1].dtype == torch.float32
