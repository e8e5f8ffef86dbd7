"""ReferenceSampler against an independent float64 loop written from the paper's equations."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddim_fast import ReferenceSampler, SamplerOutput, Schedule

from .conftest import max_err, tiny_unet


def analytic_model(x, t):
    """A smooth stand-in for a network: any function of (x, t) exercises the loop."""
    return torch.tanh(0.7 * x) * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000) + 0.05 * torch.cos(x)


def independent_loop(model, betas, grid, x, eta, clip=None, prediction="eps", clipped_eps=False, generator=None):
    """DDIM (Eq. 12) and the DDPM posterior (eta = "ddpm_noisy") in float64, from scratch."""
    a = np.cumprod(1 - np.asarray(betas, dtype=np.float64))
    alpha = lambda t: 1.0 if t < 0 else float(a[t])  # noqa: E731
    ts = sorted(grid, reverse=True)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        at, as_ = alpha(t), alpha(s)
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
        if prediction == "eps":
            e, x0 = out, (x - math.sqrt(1 - at) * out) / math.sqrt(at)
        elif prediction == "x0":
            x0, e = out, (x - math.sqrt(at) * out) / math.sqrt(1 - at)
        else:
            x0, e = math.sqrt(at) * x - math.sqrt(1 - at) * out, math.sqrt(at) * out + math.sqrt(1 - at) * x
        if clip is not None:
            x0 = x0.clamp(*clip)
            if clipped_eps:
                e = (x - math.sqrt(at) * x0) / math.sqrt(1 - at)
        if eta == "ddpm_noisy":
            beta = 1 - at / as_
            sigma = math.sqrt(beta) if s >= 0 else 0.0
            mean = (math.sqrt(as_) * beta * x0 + math.sqrt(1 - beta) * (1 - as_) * x) / (1 - at)
            x = mean + (sigma * torch.randn(x.shape, generator=generator).double() if sigma > 0 else 0)
        else:
            sigma = eta * math.sqrt((1 - as_) / (1 - at)) * math.sqrt(1 - at / as_)
            x = math.sqrt(as_) * x0 + math.sqrt(1 - as_ - sigma**2) * e
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).double()
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, "ddpm_noisy"])
@pytest.mark.parametrize("clip", [False, True, (-0.5, 2.0)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_reference_matches_independent_float64_loop(eta, clip, prediction):
    s = Schedule.linear()
    steps, skip = 7, "uniform"
    x_T = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ReferenceSampler(analytic_model, s, steps=steps, eta=eta, skip=skip, clip_x0=clip, prediction=prediction)
    got = ref.sample(x_T, generator=torch.Generator().manual_seed(1))
    rng = None if clip is False else ((-1.0, 1.0) if clip is True else clip)
    expected = independent_loop(analytic_model, s.betas64, s.timesteps(steps, skip), x_T, eta, rng, prediction, generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float64
    assert max_err(got, expected) <= 1e-10 * (1 + expected.abs().max().item())


@pytest.mark.parametrize("skip", ["quad", "trailing", "linspace", [5, 17, 300, 640, 999]])
def test_reference_on_other_grids(skip):
    s = Schedule.linear()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = 5
    got = ReferenceSampler(analytic_model, s, steps=steps, eta=0.3, skip=skip).sample(x_T, generator=torch.Generator().manual_seed(3))
    expected = independent_loop(analytic_model, s.betas64, s.timesteps(steps, skip), x_T, 0.3, generator=torch.Generator().manual_seed(3))
    assert max_err(got, expected) <= 1e-10 * (1 + expected.abs().max().item())


def test_use_clipped_model_output():
    s = Schedule.linear()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ref = ReferenceSampler(analytic_model, s, steps=6, clip_x0=True, use_clipped_model_output=True)
    got = ref.sample(x_T)
    expected = independent_loop(analytic_model, s.betas64, s.timesteps(6), x_T, 0.0, (-1.0, 1.0), clipped_eps=True)
    plain = independent_loop(analytic_model, s.betas64, s.timesteps(6), x_T, 0.0, (-1.0, 1.0), clipped_eps=False)
    assert max_err(got, expected) <= 1e-10 * (1 + expected.abs().max().item())
    assert max_err(expected, plain) > 1e-3  # the option changes the result


def test_sample_draws_x_T_from_the_generator():
    s = Schedule.linear()
    ref = ReferenceSampler(analytic_model, s, steps=4)
    g = torch.Generator().manual_seed(5)
    a = ref.sample(batch_size=2, generator=g, shape=(1, 4, 4))
    x_T = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    b = ref.sample(x_T)
    torch.testing.assert_close(a, b)


def test_float32_reference_uses_the_float32_alpha_table():
    """Like the official code; in float64 the float64 table."""
    s = Schedule.linear()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    got = ReferenceSampler(analytic_model, s, steps=5).sample(x_T)
    expected = independent_loop(analytic_model, s.betas64, s.timesteps(5), x_T.double(), 0.0)
    assert got.dtype == torch.float32
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item())


def test_x0_preds_and_trajectory():
    s = Schedule.linear()
    ref = ReferenceSampler(analytic_model, s, steps=5, eta=0.5)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = ref.sample(x_T, generator=torch.Generator().manual_seed(1), return_x0=True, return_trajectory=True)
    assert isinstance(out, SamplerOutput)
    assert len(out.x0_preds) == 5 and len(out.trajectory) == 6
    torch.testing.assert_close(out.trajectory[0], x_T)
    torch.testing.assert_close(out.trajectory[-1], out.sample)
    plain = ref.sample(x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, out.sample)
    # the last step has alpha_prev = 1 and sigma = 0: it lands on its own x0 prediction
    torch.testing.assert_close(out.x0_preds[-1], out.sample, rtol=1e-5, atol=1e-5)


def test_model_output_with_sample_attribute():
    s = Schedule.linear()
    wrapped = lambda x, t: SimpleNamespace(sample=analytic_model(x, t))  # noqa: E731
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ReferenceSampler(wrapped, s, steps=3).sample(x_T)
    b = ReferenceSampler(analytic_model, s, steps=3).sample(x_T)
    torch.testing.assert_close(a, b)


def test_model_gets_int64_timesteps_of_shape_B():
    seen = []

    def model(x, t):
        seen.append((t.dtype, tuple(t.shape), t[0].item()))
        return torch.zeros_like(x)

    ReferenceSampler(model, Schedule.linear(), steps=4).sample(torch.randn(3, 1, 2, 2))
    assert seen == [(torch.int64, (3,), t) for t in (750, 500, 250, 0)]


def test_encode_matches_independent_inversion_and_decodes_back():
    s = Schedule.linear()
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    ref = ReferenceSampler(analytic_model, s, steps=50)
    xT = ref.encode(x0)
    # independent: the step s -> t with eps = model(x_s, t)
    a = s.alphas_cumprod64
    x = x0.clone()
    grid = s.timesteps(50)
    for i, t in enumerate(grid):
        a_s = 1.0 if i == 0 else a[grid[i - 1]]
        e = analytic_model(x, torch.full((2,), t))
        x = math.sqrt(a[t]) * (x - math.sqrt(1 - a_s) * e) / math.sqrt(a_s) + math.sqrt(1 - a[t]) * e
    assert max_err(xT, x) <= 1e-10 * (1 + x.abs().max().item())


def test_reconstruction_error_falls_as_steps_grow():
    """encode then sample returns x0 with an error that falls with S (Table 2 of the paper)."""
    s = Schedule.linear()
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    errs = []
    for steps in (10, 50, 200):
        ref = ReferenceSampler(analytic_model, s, steps=steps)
        errs.append((ref.sample(ref.encode(x0)) - x0).pow(2).mean().item())
    assert errs[0] > 3 * errs[1] > 9 * errs[2]
    assert errs[2] < 1e-3


def test_reference_runs_a_unet():
    model = tiny_unet()
    out = ReferenceSampler(model, Schedule.linear(), steps=3).sample(batch_size=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
