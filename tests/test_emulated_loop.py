"""The captured loop's own code, run here: FastSampler(cuda_graph="emulate").

Emulated, the loop runs exactly what a CUDA graph would capture (its static buffers, the
device-side step counter and advance kernel, the noise buffers, the guided halves, the time
tables, the conditioning copies), with the steps launched one by one instead of replayed;
on the CPU its Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
Each test holds it to ReferenceSampler in a configuration a GPU user gets, the defaults
first: channels_last, 3 channels, η > 0. What only a GPU can run (the capture itself, the
replays, CUDA generators) is in test_cuda.py, and what surrounds it is checked here.
"""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule

from .conftest import max_err, requires_triton_interpreter, tiny_unet

pytestmark = requires_triton_interpreter

SCHEDULE = Schedule.linear()


@pytest.fixture(autouse=True)
def kernel_contracts(monkeypatch):
    """Every launch of the loop's kernels checked against what they assume on a GPU, where a
    broken assumption reads the wrong memory instead of failing: the step kernel addresses
    every operand with x's flat offsets (same shape, device and strides; a noise table holds
    one such row per step; a multistep solver's history is fp32), the coefficient table is fp32
    (rows, NUM_COEFS), the counter int32 (1,)."""
    from ddim_fast.kernels import ddim_step as k
    from ddim_fast.ops.dispatch import dense_layout

    real_launch, real_advance = k.launch, k.advance

    def like_x(name, x, t, dtypes):
        assert t.shape == x.shape and t.device == x.device and t.dtype in dtypes, (name, t.shape, t.device, t.dtype)
        assert dense_layout(x, t), (name, "not laid out like x", t.stride(), x.stride())

    def small(name, t, dtype, x):
        assert t.dtype == dtype and t.shape == (1,) and t.device == x.device, (name, t.dtype, t.shape, t.device)

    def launch(x, model_output, coef_table, step, out, *, noise=None, noise_row_stride=0, seed=None, x0_out=None, cond=None, guidance=None, history=None, **kwargs):
        assert dense_layout(x), x.stride()
        if history is not None:
            like_x("history", x, history, (torch.float32,))
        for name, t in (("model_output", model_output), ("out", out), ("x0_out", x0_out), ("cond", cond)):
            if t is not None:
                like_x(name, x, t, (x.dtype,))
        assert coef_table.dtype == torch.float32 and coef_table.dim() == 2 and coef_table.shape[1] == k.NUM_COEFS, coef_table.shape
        assert coef_table.is_contiguous() and coef_table.device == x.device
        small("step", step, torch.int32, x)
        if noise is not None and noise_row_stride == 0:
            like_x("noise", x, noise, (torch.float32, x.dtype))
        elif noise is not None:  # a table: row r at r * x.numel()
            assert noise_row_stride == x.numel() and noise.shape[1:] == x.shape and noise.shape[0] >= coef_table.shape[0]
            like_x("noise row", x, noise[0], (torch.float32, x.dtype))
            assert noise[1].data_ptr() - noise[0].data_ptr() == x.numel() * noise.element_size()
        if seed is not None:
            small("seed", seed, torch.int64, x)
        if guidance is not None:
            small("guidance", guidance, torch.float32, x)
        return real_launch(x, model_output, coef_table, step, out, noise=noise, noise_row_stride=noise_row_stride, seed=seed, x0_out=x0_out, cond=cond, guidance=guidance, history=history, **kwargs)

    def advance(step, t_table, t_buf):
        small("step", step, torch.int32, t_buf)
        assert t_table.dtype == t_buf.dtype == torch.int64 and t_table.is_contiguous() and t_buf.is_contiguous()
        assert t_table.dim() == 2 and t_table.shape[1] == t_buf.numel() and t_table.device == t_buf.device
        return real_advance(step, t_table, t_buf)

    monkeypatch.setattr(k, "launch", launch)
    monkeypatch.setattr(k, "advance", advance)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x_T(batch: int, channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, 8, 8, generator=_gen(seed))


def test_emulate_runs_the_captured_loop_not_the_eager_one():
    model = tiny_unet()
    sampler = FastSampler(model, SCHEDULE, steps=3, cuda_graph="emulate", channels_last=False)
    x_T = _x_T(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sampler.sample(x_T)
    assert len(sampler._graphs) == 1 and not sampler._graphs.capture
    ref = ReferenceSampler(model, SCHEDULE, steps=3).sample(x_T)
    assert max_err(got, ref) <= 1e-5 * (1 + ref.abs().max().item())


def test_emulate_refuses_what_the_captured_loop_does_not_do():
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'emulate'"):
        FastSampler(tiny_unet(), SCHEDULE, cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'emulate'"):
        FastSampler(tiny_unet(), SCHEDULE, cuda_graph=1)
    sampler = FastSampler(tiny_unet(), SCHEDULE, steps=2, cuda_graph="emulate")
    with pytest.raises(ValueError, match="returns only the final sample: return_x0 need cuda_graph=False"):
        sampler.sample(batch_size=1, return_x0=True)
    with pytest.raises(ValueError, match="return_trajectory need cuda_graph=False"):
        sampler.sample(batch_size=1, return_trajectory=True)
    with pytest.raises(ValueError, match="check_finite need cuda_graph=False"):
        FastSampler(tiny_unet(), SCHEDULE, steps=2, cuda_graph="emulate", check_finite=True).sample(batch_size=1)


def test_emulate_on_the_cpu_without_the_interpreter_says_how_to_get_it():
    script = (
        "import torch\n"
        "from ddim_fast import FastSampler, Schedule, UNet\n"
        "model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), in_channels=1, out_ch=1, resolution=8).eval()\n"
        "FastSampler(model, Schedule.linear(), steps=2, cuda_graph='emulate').sample(batch_size=1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "under Triton's interpreter: set TRITON_INTERPRET=1" in res.stderr, res.stderr[-2000:]


def _reference64(model, x_T, seed, **kw):
    """ReferenceSampler in float64 with the noise stream of `seed` (the float32 draws, widened)."""
    return ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, **kw).sample(x_T.double(), generator=_gen(seed))


def _assert_tracks_reference(got, model, x_T, seed, **kw):
    """got is within twice the fp32 reference's own rounding of the float64 reference."""
    ref = ReferenceSampler(model, SCHEDULE, **kw).sample(x_T, generator=_gen(seed))
    ref64 = _reference64(model, x_T, seed, **kw)
    scale = 1 + ref64.abs().max().item()
    assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * scale, (max_err(got, ref64), max_err(ref, ref64))


@pytest.mark.parametrize("channels_last", [True, False])  # True: the default
@pytest.mark.parametrize("channels", [3, 1])  # one channel: the two layouts coincide
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0, "ddpm_noisy"])
@pytest.mark.parametrize("graph_mode", ["step", "loop"])
def test_emulated_loop_equals_reference_fp32(channels_last, channels, eta, graph_mode):
    model = tiny_unet(in_channels=channels)
    x_T = _x_T(2, channels)
    sampler = FastSampler(model, SCHEDULE, steps=4, eta=eta, cuda_graph="emulate", channels_last=channels_last, graph_mode=graph_mode)
    generator = _gen(1)
    got = sampler.sample(x_T, generator=generator)
    assert len(sampler._graphs) == 1
    _assert_tracks_reference(got, model, x_T, 1, steps=4, eta=eta)
    # the caller's generator advanced as the reference's did
    ref_generator = _gen(1)
    ReferenceSampler(model, SCHEDULE, steps=4, eta=eta).sample(x_T, generator=ref_generator)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=ref_generator))
    # a second run resets the buffers and the counter
    torch.testing.assert_close(sampler.sample(x_T, generator=_gen(1)), got, rtol=0, atol=0)


class _Wrapped(torch.nn.Module):
    """A wrapper that changes what the model returns, as user code does around a UNet."""

    def __init__(self, inner, how):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x, t, **model_kwargs):
        out = self.inner(x, t, **model_kwargs)
        if self.how == "contiguous":  # e.g. a DiT-style unpatchify: NCHW whatever x is
            return out.contiguous()
        if self.how == "strided":  # the first C channels of a learned-variance output
            return torch.cat([out, out], dim=1)[:, : out.shape[1]]
        return torch.cat([out, out], dim=1)  # "2C": eps and the variance, unsplit


@pytest.mark.parametrize("how", ["contiguous", "strided"])
def test_emulated_loop_reads_a_model_output_in_another_layout_right(how):
    model = tiny_unet(in_channels=3)
    x_T = _x_T(2, 3)
    wrapped = _Wrapped(model, how)
    got = FastSampler(wrapped, SCHEDULE, steps=4, eta=1.0, cuda_graph="emulate").sample(x_T, generator=_gen(1))
    _assert_tracks_reference(got, model, x_T, 1, steps=4, eta=1.0)
    plain = lambda x, t: model(x, t).contiguous()  # noqa: E731 - not a module: run as it is
    got = FastSampler(plain, SCHEDULE, steps=4, eta=1.0, cuda_graph="emulate").sample(x_T, generator=_gen(1))
    _assert_tracks_reference(got, model, x_T, 1, steps=4, eta=1.0)


def test_emulated_loop_refuses_a_model_output_of_another_shape():
    model = _Wrapped(tiny_unet(in_channels=3), "2C")
    sampler = FastSampler(model, SCHEDULE, steps=4, cuda_graph="emulate")
    with pytest.raises(ValueError, match=r"the model output has shape \(2, 6, 8, 8\), expected x's shape \(2, 3, 8, 8\) \(a model that also predicts its variance"):
        sampler.sample(_x_T(2, 3))


def test_a_model_output_of_another_shape_is_refused_before_any_capture(monkeypatch):
    """On CUDA the loop's first steps run eagerly (warm_up) before the capture: the shape check
    there raises, and nothing is captured or swallowed into the eager fallback. Here the
    warm-up runs on the CPU without its side stream (what differs on a GPU)."""
    from ddim_fast.sampling import graph as G

    captured = []

    def warm_up_here(loop):
        for noisy in sorted(set(loop.noisy)):
            loop._reset()
            loop.one_step(noisy)

    monkeypatch.setattr(G.CapturedLoop, "warm_up", warm_up_here)
    monkeypatch.setattr(G.CapturedLoop, "capture", lambda loop, mode, pool: captured.append(mode))
    monkeypatch.setattr(G.torch.cuda, "graph_pool_handle", lambda: "pool")
    sampler = FastSampler(_Wrapped(tiny_unet(in_channels=3), "2C"), SCHEDULE, steps=3)
    cache = G.GraphCache(2)
    x = sampler._layout(_x_T(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be captured" fallback
        with pytest.raises(ValueError, match=r"the model output has shape \(2, 6, 8, 8\)"), torch.inference_mode():
            cache.run(sampler.spec("sampling"), sampler.prepared_model, x, None)
    assert captured == [] and cache.disabled_reason is None and len(cache) == 0


@pytest.mark.parametrize("graph_mode", ["step", "loop"])
@pytest.mark.parametrize("eta", [1.0, "ddpm_noisy"])
def test_emulated_loop_with_a_generator_on_another_device_draws_a_noise_table(monkeypatch, graph_mode, eta):
    """A CPU generator with a CUDA sample (what diffusers users pass) keeps the captured loop:
    each run draws the steps' noise from it in the reference's order and copies them in as
    one table. The CPU has no second device, so the generator is taken as foreign here."""
    from ddim_fast.sampling import graph as G

    monkeypatch.setattr(G, "foreign_noise_device", lambda generator, device: None if generator is None else generator.device)
    model = tiny_unet(in_channels=3)
    x_T = _x_T(2, 3)
    sampler = FastSampler(model, SCHEDULE, steps=4, eta=eta, cuda_graph="emulate", graph_mode=graph_mode)
    generator = _gen(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sampler.sample(x_T, generator=generator)
    (loop,) = sampler._graphs._entries.values()
    assert loop.z_table is not None and loop.gen is None
    _assert_tracks_reference(got, model, x_T, 1, steps=4, eta=eta)
    ref_generator = _gen(1)
    ReferenceSampler(model, SCHEDULE, steps=4, eta=eta).sample(x_T, generator=ref_generator)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=ref_generator))
    again = sampler.sample(x_T, generator=_gen(2))  # a new run draws a new table
    assert max_err(again, got) > 1e-3
    _assert_tracks_reference(again, model, x_T, 2, steps=4, eta=eta)


def test_a_cpu_generator_keeps_the_captured_loop():
    """GraphCache no longer turns a CPU generator away (it sent CUDA users with one to the eager loop)."""
    from ddim_fast.sampling import graph as G

    assert G.foreign_noise_device(_gen(0), torch.device("cuda", 0)) == torch.device("cpu")
    assert G.foreign_noise_device(_gen(0), torch.device("cpu")) is None
    assert G.foreign_noise_device(None, torch.device("cuda", 0)) is None
    sampler = FastSampler(tiny_unet(in_channels=3), SCHEDULE, steps=3, eta=0.5, cuda_graph="emulate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.sample(_x_T(1, 3), generator=_gen(0))
    assert len(sampler._graphs) == 1


def test_the_fast_rng_seed_is_drawn_on_the_generators_device(monkeypatch):
    """fast_rng's seed is one draw from the caller's generator, on the generator's device, then
    moved: torch refuses torch.randint(generator=<CPU generator>, device="cuda"), which no
    CPU run can show, so here torch.randint enforces that rule on every call (the meta device
    stands for CUDA), and the emulated loop is checked to take its seed from there."""
    from ddim_fast.sampling import graph as G
    from ddim_fast.sampling import noise

    real_randint = torch.randint

    def randint(*args, generator=None, device=None, **kw):
        if generator is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found '{generator.device.type}'")
        return real_randint(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "randint", randint)
    seed = noise.philox_seed(_gen(0), torch.device("meta"))
    assert seed.device.type == "meta" and seed.dtype == torch.int64 and seed.shape == (1,)
    assert torch.equal(noise.philox_seed(_gen(5), torch.device("cpu")), noise.philox_seed(_gen(5), torch.device("cpu")))

    drawn = []
    monkeypatch.setattr(G, "philox_seed", lambda generator, device: drawn.append(generator) or noise.philox_seed(generator, device))
    generator = _gen(3)
    FastSampler(tiny_unet(in_channels=3), SCHEDULE, steps=2, eta=1.0, fast_rng=True, cuda_graph="emulate").sample(_x_T(1, 3), generator=generator)
    assert drawn == [generator]


def test_emulated_fast_rng_noise_has_unit_moments():
    """In-kernel Philox noise is not the reference's stream: checked by moments. A model that
    predicts eps = 0 from x_T = 0 leaves sigma * z after the step 500 -> 100, and the last
    step (sigma = 0) divides by sqrt(alpha_100)."""
    zero_eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    sampler = FastSampler(zero_eps, SCHEDULE, steps=2, eta=1.0, fast_rng=True, skip=[100, 500], cuda_graph="emulate")
    out = sampler.sample(torch.zeros(16, 3, 32, 32), generator=_gen(9))
    z = out * SCHEDULE.alpha(100) ** 0.5 / SCHEDULE.sigma(500, 100, 1.0)
    assert abs(z.mean().item()) < 0.02
    assert abs(z.std().item() - 1) < 0.02
    assert abs((z**4).mean().item() - 3) < 0.1
    torch.testing.assert_close(sampler.sample(torch.zeros(16, 3, 32, 32), generator=_gen(9)), out, rtol=0, atol=0)
    assert max_err(sampler.sample(torch.zeros(16, 3, 32, 32), generator=_gen(10)), out) > 1


def test_the_sample_s_device_is_made_current(monkeypatch):
    """With x on cuda:1 and cuda:0 current, the Triton launches, the side stream and the
    capture must go to cuda:1: both loops run with x's device current. Traced on fake CUDA
    tensors (no GPU here), torch.cuda.device recording what it is entered with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ddim_fast.sampling import fast
    from ddim_fast.sampling import graph as G

    current = []

    class Device:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    seen = []
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(G.GraphCache, "run", lambda self, sampler, plan, x, *a, **k: seen.append(("captured", list(current))) or x)
    monkeypatch.setattr(fast.FastSampler, "_eager", lambda self, plan, x, *a, **k: seen.append(("eager", list(current))) or x)
    identity = lambda x, t: x  # noqa: E731
    with FakeTensorMode():
        x = torch.empty(2, 3, 8, 8, device="cuda:1")
        FastSampler(identity, SCHEDULE, steps=2).sample(x)
        FastSampler(identity, SCHEDULE, steps=2, cuda_graph=False).sample(x)
    assert seen == [("captured", [torch.device("cuda", 1)]), ("eager", [torch.device("cuda", 1)])]
    assert current == []


@pytest.mark.parametrize("eta, clip, prediction, clipped_eps", [
    (1.0, True, "eps", True),  # diffusers' use_clipped_model_output
    (0.5, (-2.0, 3.0), "v", False),
    ("ddpm_noisy", True, "x0", False),
])
def test_emulated_loop_clamps_and_reads_every_parameterisation(eta, clip, prediction, clipped_eps):
    model = tiny_unet(in_channels=3)
    x_T = _x_T(2, 3)
    kw = dict(steps=4, eta=eta, clip_x0=clip, prediction=prediction, use_clipped_model_output=clipped_eps)
    got = FastSampler(model, SCHEDULE, cuda_graph="emulate", **kw).sample(x_T, generator=_gen(1))
    ref = ReferenceSampler(model, SCHEDULE, **kw).sample(x_T, generator=_gen(1))
    # a clamp turns rounding near its edges into a jump, so against the fp32 reference
    assert max_err(got, ref) <= 1e-3 * (1 + ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_emulated_loop_in_low_precision_tracks_the_float64_reference(dtype, eta):
    """The whole loop in bf16/fp16 (x, the model, the step's storage): held to PyTorch's own
    error at that precision (the model cast, in an fp32 loop), plus the rounding of storing
    the sample in `dtype`."""
    from .conftest import CastModel

    model = tiny_unet(in_channels=3)
    x_T = _x_T(2, 3)
    got = FastSampler(model, SCHEDULE, steps=4, eta=eta, dtype=dtype, cuda_graph="emulate").sample(x_T, generator=_gen(1))
    assert got.dtype == dtype
    ref64 = _reference64(model, x_T, 1, steps=4, eta=eta)
    own = max_err(ReferenceSampler(CastModel(model, dtype), SCHEDULE, steps=4, eta=eta).sample(x_T, generator=_gen(1)), ref64)
    assert 0 < own
    assert max_err(got, ref64) <= 2 * own + torch.finfo(dtype).eps * ref64.abs().max().item()


@pytest.mark.parametrize("channels_last", [True, False])
def test_emulated_loop_encodes_like_the_reference(channels_last):
    model = tiny_unet(in_channels=3)
    x0 = torch.rand(2, 3, 8, 8, generator=_gen(0)) * 2 - 1
    sampler = FastSampler(model, SCHEDULE, steps=5, cuda_graph="emulate", channels_last=channels_last)
    got = sampler.encode(x0)
    (loop,) = sampler._graphs._entries.values()
    assert loop.spec.encoding
    ref = ReferenceSampler(model, SCHEDULE, steps=5).encode(x0)
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=5).encode(x0.double())
    assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())


@pytest.mark.parametrize("eta, rescale", [(1.0, None), (0.0, None), (0.5, 0.6)])
@pytest.mark.parametrize("lean", [True, False])
def test_emulated_guided_loop_replays_new_labels_and_scales(eta, rescale, lean):
    """Classifier-free guidance with class labels: the model runs on the doubled batch, the
    step reads both halves; a second run with other labels and another w reuses the loop
    (its kwargs and w are static buffers) and gives the reference's result for them."""
    model = tiny_unet(in_channels=3, num_classes=10)
    x_T = _x_T(2, 3)
    sampler = FastSampler(model, SCHEDULE, steps=4, eta=eta, lean=lean, cuda_graph="emulate")
    null = {"class_labels": torch.tensor([10, 10])}
    for labels, w in (([3, 4], 2.0), ([7, 1], 5.0)):
        kw = dict(model_kwargs={"class_labels": torch.tensor(labels)}, guidance_scale=w, uncond_kwargs=null, guidance_rescale=rescale)
        got = sampler.sample(x_T, generator=_gen(1), **kw)
        ref = ReferenceSampler(model, SCHEDULE, steps=4, eta=eta).sample(x_T, generator=_gen(1), **kw)
        ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=4, eta=eta).sample(x_T.double(), generator=_gen(1), **kw)
        assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())
    assert len(sampler._graphs) == 1


@pytest.mark.parametrize("eta, rescale", [(1.0, None), (1.0, 0.7), (0.0, None)])
def test_emulated_guided_loop_of_a_unet2dcondition(eta, rescale):
    """A tiny Stable-Diffusion-shaped UNet2DConditionModel (4 channels, cross-attention), run
    from its time table, with text-embedding guidance."""
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from .test_diffusers import _unet2d_condition

    unet = _unet2d_condition()
    x_T = torch.randn(2, 4, 8, 8, generator=_gen(0))
    kw = dict(
        model_kwargs={"encoder_hidden_states": torch.randn(2, 5, 16, generator=_gen(1))},
        guidance_scale=7.5,
        uncond_kwargs={"encoder_hidden_states": torch.randn(2, 5, 16, generator=_gen(2))},
        guidance_rescale=rescale,
    )
    sampler = FastSampler(unet, SCHEDULE, steps=4, eta=eta, cuda_graph="emulate")
    got = sampler.sample(x_T, generator=_gen(3), **kw)
    (loop,) = sampler._graphs._entries.values()
    assert loop.table is not None and loop.guide is not None
    ref = ReferenceSampler(unet, SCHEDULE, steps=4, eta=eta).sample(x_T, generator=_gen(3), **kw)
    ref64 = ReferenceSampler(copy.deepcopy(unet).double(), SCHEDULE, steps=4, eta=eta)
    kw64 = dict(kw, model_kwargs={"encoder_hidden_states": kw["model_kwargs"]["encoder_hidden_states"].double()},
                uncond_kwargs={"encoder_hidden_states": kw["uncond_kwargs"]["encoder_hidden_states"].double()})
    ref64 = ref64.sample(x_T.double(), generator=_gen(3), **kw64)
    assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())


def test_emulated_loop_of_a_diffusers_unet2dmodel():
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from .test_diffusers import _unet2d

    unet = _unet2d()
    x_T = _x_T(2, 3)
    got = FastSampler(unet, SCHEDULE, steps=4, eta=0.5, cuda_graph="emulate").sample(x_T, generator=_gen(1))
    ref = ReferenceSampler(unet, SCHEDULE, steps=4, eta=0.5).sample(x_T, generator=_gen(1))
    ref64 = ReferenceSampler(copy.deepcopy(unet).double(), SCHEDULE, steps=4, eta=0.5).sample(x_T.double(), generator=_gen(1))
    assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("how", [None, "contiguous"])
def test_eager_loop_on_the_triton_step_reads_a_device_table(monkeypatch, guided, how):
    """The eager loop where the step's backend is Triton (CUDA without the native ops, or
    backend="triton"): the kernel reads row i of a table made once, as the captured loop's
    does, not through the op's eager entry, which copies a new one-row table to the device
    every step (a pageable copy and a sync on CUDA). Here under the interpreter,
    channels_last, eta = 1, and a model output in another layout."""
    from ddim_fast.kernels import ddim_step as tk

    def per_step_entry(*args, **kwargs):
        raise AssertionError("the sampler's Triton step went through the op's per-call entry")

    monkeypatch.setattr(tk, "ddim_step", per_step_entry)
    model = tiny_unet(in_channels=3, num_classes=10 if guided else None)
    run = model if how is None else _Wrapped(model, how)
    x_T = _x_T(2, 3)
    kw = {}
    if guided:
        kw = dict(model_kwargs={"class_labels": torch.tensor([1, 2])}, guidance_scale=3.0, uncond_kwargs={"class_labels": torch.tensor([10, 10])})
    sampler = FastSampler(run, SCHEDULE, steps=4, eta=1.0, cuda_graph=False, backend="triton")
    got = sampler.sample(x_T, generator=_gen(1), **kw)
    assert sampler.sample(x_T, **kw).isfinite().all()  # no generator: the device's default one
    ref = ReferenceSampler(model, SCHEDULE, steps=4, eta=1.0).sample(x_T, generator=_gen(1), **kw)
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=4, eta=1.0).sample(x_T.double(), generator=_gen(1), **kw)
    assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("generators", ["one", "list"])  # one: drawn in the loop (z_draw); a list: the per-run table
def test_emulated_guided_loop_with_diffusers_noise_tracks_the_reference(dtype, generators):
    """What accelerate(pipe) gives the loop, in the configuration users get: channels_last, 3
    channels, η = 1, guided with class labels, fp32 and bf16, with the noise drawn as diffusers
    draws it (fp16 draws; one generator, or a list with one per sample). 6x6 images: at 108
    elements a sample, torch.randn in fp16 is another stream than fp32's, not its rounding."""
    from .conftest import CastModel

    model = tiny_unet(in_channels=3, num_classes=10, resolution=6)
    x_T = torch.randn(2, 3, 6, 6, generator=_gen(0))
    gens = (lambda: _gen(1)) if generators == "one" else (lambda: [_gen(1), _gen(2)])
    kw = dict(model_kwargs={"class_labels": torch.tensor([3, 4])}, guidance_scale=3.0, uncond_kwargs={"class_labels": torch.tensor([10, 10])}, noise_dtype=torch.float16)
    sampler = FastSampler(model, SCHEDULE, steps=4, eta=1.0, dtype=dtype, cuda_graph="emulate")
    got = sampler.sample(x_T, generator=gens(), **kw)
    (loop,) = sampler._graphs._entries.values()
    assert (loop.z_table is not None) == (generators == "list") and loop.x.is_contiguous(memory_format=torch.channels_last)
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=4, eta=1.0).sample(x_T.double(), generator=gens(), **kw)
    own_model = model if dtype == torch.float32 else CastModel(model, dtype)
    own = max_err(ReferenceSampler(own_model, SCHEDULE, steps=4, eta=1.0).sample(x_T, generator=gens(), **kw), ref64)
    slack = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert got.dtype == dtype
    assert max_err(got, ref64) <= 2 * own + slack * (1 + ref64.abs().max().item())
