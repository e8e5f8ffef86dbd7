"""Bad input gets a clear error; awkward input just works; nothing leaks; the package
degrades gracefully without its extension or Triton."""

import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddim_fast import FastSampler, ReferenceSampler, Schedule, ops
from ddim_fast.core.grids import timestep_grid

from .conftest import max_err, tiny_unet

SCHEDULE = Schedule.linear()
MODEL = tiny_unet()

# --- bad input: (what, callable, exception, words in the message) -----------------------

BAD_CONSTRUCTION = [
    ("steps 0", dict(steps=0), ValueError, r"steps must be in \[1, 1000\].*got 0"),
    ("steps > T", dict(steps=1001), ValueError, r"steps must be in \[1, 1000\].*got 1001"),
    ("steps float", dict(steps=10.0), TypeError, "steps must be an int"),
    ("eta > 1", dict(eta=1.5), ValueError, r"eta must be in \[0, 1\].*got 1.5"),
    ("eta < 0", dict(eta=-0.1), ValueError, r"eta must be in \[0, 1\]"),
    ("eta typo", dict(eta="ddpm"), ValueError, "eta must be a number in \\[0, 1\\] or 'ddpm_noisy', got 'ddpm'"),
    ("eta list", dict(eta=[0.5]), TypeError, "eta must be a number"),  # (None: the solver's own eta, test_solvers.py)
    ("skip name", dict(skip="cubic"), ValueError, "unknown skip type 'cubic'; expected one of"),
    ("skip dupes", dict(steps=3, skip=[1, 1, 2]), ValueError, "distinct timesteps; repeated: \\[1\\]"),
    ("skip range", dict(steps=2, skip=[0, 1000]), ValueError, r"timesteps in \[0, 1000\), got 1000"),
    ("skip len", dict(steps=50, skip=[1, 2, 3]), ValueError, "holds 3 timesteps but steps=50; pass steps=3"),
    ("skip kind", dict(steps=2, skip=[0.5, 1]), TypeError, "must hold ints"),
    ("prediction", dict(prediction="noise"), ValueError, "unknown prediction type 'noise'; expected one of \\('eps', 'x0', 'v'\\)"),
    ("clip negative", dict(clip_x0=-1.0), ValueError, "clip_x0 as a number is the half-width r"),
    ("clip order", dict(clip_x0=(1.0, -1.0)), ValueError, "clip_x0 range must have lo < hi"),
    ("clip kind", dict(clip_x0="yes"), TypeError, "clip_x0 must be False, True, a float r"),
    ("check_finite", dict(check_finite=1), TypeError, "check_finite must be True or False"),
    ("offset w/o leading", dict(steps_offset=1), ValueError, "steps_offset applies to skip='leading'"),
]


@pytest.mark.parametrize("sampler_cls", [ReferenceSampler, FastSampler])
@pytest.mark.parametrize("what, kwargs, exc, words", BAD_CONSTRUCTION, ids=[b[0] for b in BAD_CONSTRUCTION])
def test_bad_construction(sampler_cls, what, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        sampler_cls(MODEL, SCHEDULE, **kwargs)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(dtype="fp64"), ValueError, "dtype must be one of"),
    (dict(fuse="yes"), ValueError, "fuse must be True, False or 'inplace'"),
    (dict(channels_last="no"), TypeError, "channels_last must be True or False"),
    (dict(backend="metal"), ValueError, "unknown backend 'metal'"),
])
def test_bad_fast_options(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        FastSampler(MODEL, SCHEDULE, **kwargs)


def test_bad_schedule_and_model():
    with pytest.raises(TypeError, match="schedule must be a ddim_fast.Schedule"):
        ReferenceSampler(MODEL, "linear")
    with pytest.raises(TypeError, match="model must be callable"):
        FastSampler(42, SCHEDULE)
    with pytest.raises(ValueError, match="num_train_timesteps must be positive, got 0"):
        Schedule.linear(0)
    with pytest.raises(TypeError, match="num_train_timesteps must be an int"):
        Schedule.linear(10.5)


BAD_SAMPLE = [
    ("not a tensor", dict(x_T=[[1.0]]), TypeError, "x_T must be a tensor"),
    ("int tensor", dict(x_T=torch.zeros(1, 1, 8, 8, dtype=torch.long)), TypeError, "x_T must be a floating-point tensor, got torch.int64"),
    ("rank", dict(x_T=torch.zeros(1, 8, 8)), ValueError, r"must be \(B, C, H, W\) for this image model, got shape \(1, 8, 8\)"),
    ("channels", dict(x_T=torch.zeros(1, 3, 8, 8)), ValueError, "must have the model's 1 channels"),
    ("nothing", dict(), ValueError, "pass x_T \\(the initial noise\\) or batch_size"),
    ("batch disagrees", dict(x_T=torch.zeros(2, 1, 8, 8), batch_size=3), ValueError, "batch_size=3 disagrees with x_T's batch 2"),
    ("negative batch", dict(batch_size=-1), ValueError, "batch_size must be an int >= 0"),
]


@pytest.mark.parametrize("sampler_cls", [ReferenceSampler, FastSampler])
@pytest.mark.parametrize("what, kwargs, exc, words", BAD_SAMPLE, ids=[b[0] for b in BAD_SAMPLE])
def test_bad_sample_input(sampler_cls, what, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        sampler_cls(MODEL, SCHEDULE, steps=2).sample(**kwargs)


@pytest.mark.parametrize("sampler_cls", [ReferenceSampler, FastSampler])
def test_model_output_shape_is_checked_on_the_first_step(sampler_cls):
    def variance_model(x, t):
        return torch.cat([x, x], dim=1)

    with pytest.raises(ValueError, match=r"model output has shape \(2, 2, 4, 4\), expected x's shape \(2, 1, 4, 4\).*2C channels"):
        sampler_cls(variance_model, SCHEDULE, steps=3).sample(torch.zeros(2, 1, 4, 4))


@pytest.mark.parametrize("sampler_cls", [ReferenceSampler, FastSampler])
def test_check_finite_names_the_step(sampler_cls):
    def exploding(x, t):
        return torch.full_like(x, float("inf")) if int(t[0]) < 500 else torch.zeros_like(x)

    s = sampler_cls(exploding, SCHEDULE, steps=4, check_finite=True)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at step 2 \(t=250\)"):
        s.sample(torch.zeros(1, 1, 4, 4))
    sampler_cls(exploding, SCHEDULE, steps=4).sample(torch.zeros(1, 1, 4, 4))  # off by default: no error


BAD_OPS = [
    ("shape", lambda: ops.ddim_step(torch.zeros(2, 3), torch.zeros(3, 2), 0.5, 0.9, 0.0), ValueError, r"eps must have x's shape \(2, 3\), got \(3, 2\)"),
    ("dtype", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2, dtype=torch.float16), 0.5, 0.9, 0.0), TypeError, "eps must have x's dtype torch.float32, got torch.float16"),
    ("int", lambda: ops.ddim_step(torch.zeros(2, dtype=torch.int32), torch.zeros(2), 0.5, 0.9, 0.0), TypeError, "x must be a floating-point tensor"),
    ("alpha 0", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.0, 0.9, 0.0), ValueError, r"alpha_t must be in \(0, 1\], got 0.0"),
    ("alpha > 1", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.5, 1.2, 0.0), ValueError, r"alpha_prev must be in \(0, 1\], got 1.2"),
    ("sigma too big", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.5, 0.9, 0.5), ValueError, "sigma² must be <= 1 - alpha_prev"),
    ("sigma negative", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.5, 0.9, -0.1), ValueError, "sigma must be a finite number >= 0"),
    ("out shape", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.5, 0.9, 0.0, out=torch.zeros(3)), ValueError, r"out must have x's shape \(2,\), got \(3,\)"),
    ("out dtype", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.5, 0.9, 0.0, out=torch.zeros(2, dtype=torch.float64)), TypeError, "out must have x's dtype"),
    ("noise shape", lambda: ops.ddim_step(torch.zeros(2), torch.zeros(2), 0.5, 0.9, 0.1, noise=torch.zeros(4)), ValueError, "noise must have x's shape"),
    ("prediction", lambda: ops.predict_x0(torch.zeros(2), torch.zeros(2), 0.5, prediction="score"), ValueError, "unknown prediction type 'score'"),
    ("backend", lambda: ops.predict_x0(torch.zeros(2), torch.zeros(2), 0.5, backend="tpu"), ValueError, "unknown backend 'tpu'"),
    ("backend device", lambda: ops.predict_x0(torch.zeros(2), torch.zeros(2), 0.5, backend="cuda"), ValueError, "backend 'cuda' needs cuda tensors"),
    ("groups", lambda: ops.group_norm_silu(torch.zeros(1, 6, 2, 2), 4), ValueError, "num_groups must divide the number of channels: C = 6, num_groups = 4"),
    ("weight size", lambda: ops.group_norm_silu(torch.zeros(1, 6, 2, 2), 3, torch.ones(5)), ValueError, r"weight must have shape \(6,\), got \(5,\)"),
    ("add_bias size", lambda: ops.group_norm_silu(torch.zeros(2, 6, 2, 2), 3, add_bias=torch.ones(3, 6)), ValueError, r"add_bias must have shape \(2, 6\) or \(6,\), got \(3, 6\)"),
    ("rank", lambda: ops.group_norm_silu(torch.zeros(6), 3), ValueError, r"x must be \(N, C, \*spatial\)"),
    ("gn eps", lambda: ops.group_norm_silu(torch.zeros(1, 6, 2, 2), 3, eps=0), ValueError, "eps must be a number > 0"),
]


@pytest.mark.parametrize("what, fn, exc, words", BAD_OPS, ids=[b[0] for b in BAD_OPS])
def test_bad_op_input(what, fn, exc, words):
    with pytest.raises(exc, match=words):
        fn()


# --- awkward but valid input --------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda x: x.contiguous(memory_format=torch.channels_last),
    lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),  # non-contiguous view
    lambda x: torch.stack([x, x], dim=1).flatten(0, 1)[::2],  # strided batch
])
def test_awkward_layouts_give_the_same_samples(make):
    model = tiny_unet(in_channels=3)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ReferenceSampler(model, SCHEDULE, steps=3, eta=0.5).sample(x_T, generator=torch.Generator().manual_seed(1))
    for cls in (ReferenceSampler, FastSampler):
        got = cls(model, SCHEDULE, steps=3, eta=0.5).sample(make(x_T), generator=torch.Generator().manual_seed(1))
        assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())


def test_odd_spatial_sizes_with_a_generic_model():
    model = lambda x, t: torch.tanh(x) * 0.5  # noqa: E731
    x_T = torch.randn(1, 3, 7, 5, generator=torch.Generator().manual_seed(0))
    a = ReferenceSampler(model, SCHEDULE, steps=5, eta=1.0).sample(x_T, generator=torch.Generator().manual_seed(2))
    b = FastSampler(model, SCHEDULE, steps=5, eta=1.0).sample(x_T, generator=torch.Generator().manual_seed(2))
    assert max_err(a, b) <= 1e-5 * (1 + a.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_just_work(dtype):
    model = tiny_unet().to(dtype)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ReferenceSampler(model, SCHEDULE, steps=3).sample(x_T)  # fp32 loop, the model in its dtype
    fast = FastSampler(model, SCHEDULE, steps=3).sample(x_T)  # samples in the model's dtype
    assert ref.dtype == torch.float32 and fast.dtype == dtype
    assert torch.isfinite(ref).all() and torch.isfinite(fast).all()
    assert max_err(fast, ref) <= 0.05 * (1 + ref.abs().max().item())


# --- graceful degradation ------------------------------------------------------------------

_FALLBACK = textwrap.dedent(
    """
    import warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as w:
        import ddim_fast
        from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet, backends
        b = backends()
        torch.manual_seed(0)
        m = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, in_channels=1, out_ch=1, resolution=4).eval()
        x = torch.randn(2, 1, 4, 4)
        a = FastSampler(m, Schedule.linear(), steps=3).sample(x)
        a2 = FastSampler(m, Schedule.linear(), steps=3).sample(x)
        r = ReferenceSampler(m, Schedule.linear(), steps=3).sample(x)
    msgs = [str(x.message) for x in w if "fused native cpu ops are off" in str(x.message)]
    print("CPU", b["cpu"]["available"], "|", b["cpu"]["reason"])
    print("TRITON", b["triton"]["available"], "|", b["triton"]["reason"])
    print("WARNINGS", len(msgs))
    print("ERR", float((a - r).abs().max()))
    """
)


def _run(code, env_extra=None, pre=""):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_missing_extension_falls_back_and_warns_once():
    out = _run(_FALLBACK, {"DDIM_FAST_DISABLE_EXTENSION": "1"})
    assert "CPU False | disabled by DDIM_FAST_DISABLE_EXTENSION=1" in out, out
    assert "WARNINGS 1" in out, out
    err = float(out.split("ERR")[1])
    assert err < 1e-4


def test_missing_triton_is_reported_and_nothing_breaks():
    out = _run(_FALLBACK, pre="import sys; sys.modules['triton'] = None\n")
    assert "TRITON False | triton is not installed" in out, out
    assert "CPU True" in out and "WARNINGS 0" in out, out


# --- resources -----------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_no_memory_growth_over_200_calls():
    model = tiny_unet()
    sampler = FastSampler(model, SCHEDULE, steps=2, eta=0.5)
    x_T = torch.randn(2, 1, 8, 8)
    for _ in range(20):
        sampler.sample(x_T)
    gc.collect()
    before = _rss_mb()
    for _ in range(200):
        sampler.sample(x_T)
    gc.collect()
    grown = _rss_mb() - before
    assert grown < 20, f"RSS grew {grown:.1f} MB over 200 calls"  # MB; a leak of one 8x8 sample per call would not show, a buffer per step would


def test_two_samplers_in_two_threads_do_not_interfere():
    model = tiny_unet()
    samplers = [FastSampler(model, SCHEDULE, steps=4, eta=0.5), FastSampler(model, SCHEDULE, steps=4, eta=0.0)]
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = [s.sample(x_T, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(samplers)]
    results = {}

    def work(i):
        results[i] = [samplers[i % 2].sample(x_T, generator=torch.Generator().manual_seed(i % 2)) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        for o in outs:
            torch.testing.assert_close(o, expected[i % 2], rtol=0, atol=0)


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 2000), data=st.data())
def test_grids_are_increasing_in_range_with_steps_points(T, data):
    steps = data.draw(st.integers(1, T))
    skip = data.draw(st.sampled_from(["uniform", "leading", "trailing", "linspace", "quad"]))
    if skip == "quad" and steps > 1 and 0.8 * T < 1:
        return
    grid = timestep_grid(T, steps, skip)
    assert len(grid) == steps
    assert all(0 <= t < T or (skip == "quad" and t <= int(0.8 * T) + 1) for t in grid)
    assert grid == sorted(grid)
    if skip != "quad":
        assert len(set(grid)) == steps


@settings(max_examples=40, deadline=None)
@given(a_t=st.floats(1e-4, 0.9999), frac=st.floats(0.0, 1.0), eta=st.floats(0.0, 1.0))
def test_sigma_never_exceeds_the_update_budget(a_t, frac, eta):
    a_s = a_t + (1 - a_t) * frac  # alpha_prev >= alpha_t
    s = Schedule.from_betas([0.5])  # only its formula is used
    s.alpha = lambda t: {0: a_t, 1: a_s}[t]
    sigma = s.sigma(0, 1, eta)
    assert 0 <= sigma**2 <= (1 - a_s) * (1 + 1e-9) + 1e-15


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), a_t=st.floats(0.01, 0.99), a_s_frac=st.floats(0.0, 1.0), eta=st.floats(0.0, 1.0), pred=st.sampled_from(["eps", "x0", "v"]), clip=st.sampled_from([None, 1.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_native_step_matches_torch_on_random_inputs(shape, a_t, a_s_frac, eta, pred, clip, dtype):
    a_s = a_t + (1 - a_t) * a_s_frac
    sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
    g = torch.Generator().manual_seed(len(shape))
    x, e, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    a = ops.ddim_step(x, e, a_t, a_s, sigma, noise=z, clip=clip, prediction=pred)
    b = ops.ddim_step(x, e, a_t, a_s, sigma, noise=z, clip=clip, prediction=pred, backend="torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max_err(a, b) <= tol * (1 + b.abs().max().item())
