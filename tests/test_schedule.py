"""Schedule math: closed forms, grids, per-step coefficients."""

import math

import numpy as np
import pytest
import torch

from ddim_fast import Schedule
from ddim_fast.core.grids import timestep_grid
from ddim_fast.core.plan import C_EPS, C_X0, C_X0_PREV, C_XT, SIGMA, SQRT_ALPHA_T, SQRT_ONE_MINUS_ALPHA_T
from ddim_fast.core.solvers.ddim import encoding_plan, sampling_plan


# --- beta schedules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, first, last",
    [
        (lambda: Schedule.linear(1000, 1e-4, 0.02), 1e-4, 0.02),
        (lambda: Schedule.quad(1000, 1e-4, 0.02), 1e-4, 0.02),
        (lambda: Schedule.scaled_linear(1000, 0.00085, 0.012), 0.00085, 0.012),
        (lambda: Schedule.const(1000, 0.02), 0.02, 0.02),
        (lambda: Schedule.jsd(1000), 1e-3, 1.0),
    ],
)
def test_beta_endpoints(make, first, last):
    s = make()
    assert s.num_train_timesteps == 1000
    assert s.betas.dtype == torch.float32 and s.alphas_cumprod.dtype == torch.float32
    assert s.betas64[0] == pytest.approx(first, rel=1e-12)
    assert s.betas64[-1] == pytest.approx(last, rel=1e-12)


def test_alphas_cumprod_is_the_product_in_float64():
    s = Schedule.linear()
    b = np.linspace(1e-4, 0.02, 1000)
    expected = np.cumprod(1 - b)
    np.testing.assert_allclose(s.alphas_cumprod64, expected, rtol=1e-13)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), expected.astype(np.float32), rtol=0)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy() ** 2 + s.sqrt_alphas_cumprod.numpy() ** 2, 1, atol=1e-6)


def test_sigmoid_and_cosine_closed_forms():
    T = 50
    s = Schedule.sigmoid(T, 1e-4, 0.02)
    u = np.linspace(-6, 6, T)
    np.testing.assert_allclose(s.betas64, 1 / (1 + np.exp(-u)) * (0.02 - 1e-4) + 1e-4, rtol=1e-13)
    c = Schedule.cosine(T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # alpha_bar(t) / alpha_bar(0) is the cumulative product where no beta is capped
    for t in (0, 10, 25, 40):
        assert c.alphas_cumprod64[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert c.betas64.max() <= 0.999


def test_from_betas_and_from_name():
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    s = Schedule.from_betas(betas)
    np.testing.assert_allclose(s.betas64, betas.numpy())
    assert Schedule.from_name("squaredcos_cap_v2", 100).betas64 == pytest.approx(Schedule.cosine(100).betas64)
    with pytest.raises(ValueError, match="unknown beta schedule 'cubic'"):
        Schedule.from_name("cubic")


@pytest.mark.parametrize("betas, words", [([0.1, 0.0], "betas\\[1\\] = 0.0"), ([0.1, 1.5], "in \\(0, 1\\]"), ([[0.1]], "1-D"), ([], "non-empty")])
def test_bad_betas(betas, words):
    with pytest.raises(ValueError, match=words):
        Schedule.from_betas(betas)


def test_alpha_at_minus_one_is_one():
    s = Schedule.linear()
    assert s.alpha(-1) == 1.0
    assert s.alpha(0) == pytest.approx(1 - 1e-4)
    with pytest.raises(ValueError, match="timestep must be in"):
        s.alpha(1000)


# --- sigma ------------------------------------------------------------------------------------


def test_sigma_eta1_is_ddpm_posterior_std():
    """η = 1 on consecutive timesteps is DDPM's posterior variance β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t."""
    s = Schedule.linear()
    b, a = s.betas64, s.alphas_cumprod64
    for t in (1, 10, 500, 999):
        post_var = (1 - a[t - 1]) / (1 - a[t]) * b[t]
        assert s.sigma(t, t - 1, 1.0) == pytest.approx(math.sqrt(post_var), rel=1e-12)
    assert s.sigma(500, 499, 0.0) == 0.0
    assert s.sigma(500, 480, 0.5) == pytest.approx(0.5 * s.sigma(500, 480, 1.0), rel=1e-12)
    # sigma-hat: sqrt(1 - a_t / a_s)
    assert s.sigma(500, 480, "ddpm_noisy") == pytest.approx(math.sqrt(1 - a[500] / a[480]), rel=1e-12)


def test_eta0_step_with_true_eps_recovers_x0_exactly():
    """x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps; one DDIM step with the true eps lands on
    sqrt(a_s) x0 + sqrt(1-a_s) eps, and the last step (to -1) on x0."""
    s = Schedule.linear()
    grid = s.timesteps(20)
    plan = sampling_plan(s, grid, 0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1000, generator=g, dtype=torch.float64)
    eps = torch.randn(1000, generator=g, dtype=torch.float64)
    t0 = plan.timesteps[0]
    x = math.sqrt(s.alpha(t0)) * x0 + math.sqrt(1 - s.alpha(t0)) * eps
    for i, (t, prev) in enumerate(zip(plan.timesteps, plan.prev)):
        sa, s1m, c_x0, c_eps, c_xt = (plan.coefs[i, c] for c in (SQRT_ALPHA_T, SQRT_ONE_MINUS_ALPHA_T, C_X0, C_EPS, C_XT))
        assert plan.coefs[i, C_X0_PREV] == 0  # DDIM is one-step
        x0_hat = (x - s1m * eps) / sa
        x = c_x0 * x0_hat + c_eps * eps + c_xt * x
        expected = math.sqrt(s.alpha(prev)) * x0 + math.sqrt(1 - s.alpha(prev)) * eps
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_update_keeps_the_marginals_of_q(eta):
    """With the true eps and fresh noise, x_s has mean sqrt(a_s) x0 and variance 1 - a_s
    (the DDIM paper's Lemma 1: the marginals of q(x_t | x0) are those of DDPM)."""
    s = Schedule.linear()
    t, prev = 600, 400
    a_t, a_s = s.alpha(t), s.alpha(prev)
    sigma = s.sigma(t, prev, eta)
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = 0.7
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    x_s = math.sqrt(a_s) * x0_hat + math.sqrt(1 - a_s - sigma**2) * eps + sigma * z
    assert x_s.mean().item() == pytest.approx(math.sqrt(a_s) * x0, abs=4 / math.sqrt(n))
    assert x_s.var().item() == pytest.approx(1 - a_s, rel=0.01)


# --- grids ------------------------------------------------------------------------------------


def test_uniform_grid_is_the_official_range():
    assert timestep_grid(1000, 10) == list(range(0, 1000, 100))
    assert timestep_grid(1000, 1000) == list(range(1000))
    assert timestep_grid(1000, 1) == [0]


def test_uniform_grid_when_steps_do_not_divide_T():
    # the official range(0, 1000, 33) has 31 points; `steps` means steps: the first 30
    g = timestep_grid(1000, 30)
    assert len(g) == 30
    assert g == list(range(0, 1000, 33))[:30]
    assert timestep_grid(1000, 7) == list(range(0, 1000, 142))[:7]


def test_quad_grid_is_the_official_formula():
    expected = [int(v) for v in np.linspace(0, np.sqrt(800), 50) ** 2]
    assert timestep_grid(1000, 50, "quad") == expected
    assert expected[-1] == 800  # int(sqrt(0.8 T)²)


def test_leading_trailing_linspace():
    assert timestep_grid(1000, 10, "leading", 1) == [1 + 100 * i for i in range(10)]
    assert timestep_grid(1000, 10, "trailing") == [99 + 100 * i for i in range(10)]
    assert timestep_grid(1000, 3, "trailing") == [332, 666, 999]
    assert timestep_grid(1000, 3, "linspace") == [0, 500, 999]
    assert timestep_grid(1000, 10, "leading") == timestep_grid(1000, 10, "uniform")


def test_explicit_grid_is_sorted_and_checked():
    assert timestep_grid(1000, 3, [900, 10, 500]) == [10, 500, 900]
    with pytest.raises(ValueError, match="distinct"):
        timestep_grid(1000, 3, [1, 1, 2])
    with pytest.raises(ValueError, match=r"in \[0, 1000\)"):
        timestep_grid(1000, 2, [0, 1000])
    with pytest.raises(TypeError, match="ints"):
        timestep_grid(1000, 2, [0, 1.5])


@pytest.mark.parametrize("steps, skip, err, words", [
    (0, "uniform", ValueError, r"steps must be in \[1, 1000\]"),
    (1001, "uniform", ValueError, r"steps must be in \[1, 1000\]"),
    (2.0, "uniform", TypeError, "steps must be an int"),
    (10, "cubic", ValueError, "unknown skip type 'cubic'"),
])
def test_bad_grid_arguments(steps, skip, err, words):
    with pytest.raises(err, match=words):
        timestep_grid(1000, steps, skip)


@pytest.mark.parametrize("skip", ["uniform", "quad", "trailing", "linspace", [3, 70, 400, 999]])
def test_previous_point_is_the_next_grid_element(skip):
    s = Schedule.linear()
    grid = s.timesteps(4, skip)
    plan = sampling_plan(s, grid, 0.5)
    assert list(plan.timesteps) == sorted(grid, reverse=True)
    assert list(plan.prev) == sorted(grid, reverse=True)[1:] + [-1]
    enc = encoding_plan(s, grid)
    assert list(enc.timesteps) == grid and list(enc.prev) == [-1] + grid[:-1]


def test_ddpm_noisy_plan_is_the_ddpm_posterior_mean():
    s = Schedule.linear()
    plan = sampling_plan(s, s.timesteps(10), "ddpm_noisy")
    for i, (t, p) in enumerate(zip(plan.timesteps, plan.prev)):
        a_t, a_s = s.alpha(t), s.alpha(p)
        beta = 1 - a_t / a_s
        assert plan.coefs[i, C_X0] == pytest.approx(math.sqrt(a_s) * beta / (1 - a_t))
        assert plan.coefs[i, C_XT] == pytest.approx(math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t))
        assert plan.coefs[i, C_EPS] == 0
        assert plan.coefs[i, SIGMA] == (pytest.approx(math.sqrt(beta)) if i < 9 else 0.0)


def test_alpha_zero_on_the_grid_is_rejected():
    s = Schedule.jsd(100)  # beta_99 = 1: alpha_99 = 0
    with pytest.raises(ValueError, match="alpha_t is 0 at timestep 99"):
        sampling_plan(s, s.timesteps(100), 0.0)
    sampling_plan(s, s.timesteps(10), 0.0)  # range(0, 100, 10) avoids t = 99
