"""FastSampler on a CUDA GPU: the captured loop, the eager native path, and their promises.

Skipped without CUDA (the CPU-side logic is in test_graph_loop.py). Run on the GPU
machine by benchmarks/gpu_run.sh.
"""

import copy
import warnings

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule

from .conftest import max_err, tiny_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEDULE = Schedule.linear()


def _model(**kw):
    return tiny_unet(in_channels=3, resolution=16, **kw).cuda()


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _x_T(batch=2, seed=0):
    return torch.randn(batch, 3, 16, 16, generator=_gen(seed), device="cuda")


@pytest.mark.parametrize("steps", [10, 20, 50, 100, 1000])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_graph_equals_eager_equals_reference_fp32(steps, eta):
    model = _model()
    x_T = _x_T()
    ref = ReferenceSampler(model, SCHEDULE, steps=steps, eta=eta).sample(x_T, generator=_gen(1))
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=steps, eta=eta).sample(x_T.double(), generator=_gen(1))
    graph = FastSampler(model, SCHEDULE, steps=steps, eta=eta).sample(x_T, generator=_gen(1))
    eager = FastSampler(model, SCHEDULE, steps=steps, eta=eta, cuda_graph=False).sample(x_T, generator=_gen(1))
    own = max_err(ref, ref64)
    scale = 1 + ref64.abs().max().item()
    for got in (graph, eager):
        assert max_err(got, ref64) <= 2 * own + 1e-5 * scale
    # Not bit-equal: under capture cuDNN may run other convolution algorithms (it cannot
    # grow its workspace there), so graph and eager are two fp32 computations of the same
    # thing, each within the reference's own rounding (TF32 is off: tests/conftest.py).
    assert max_err(graph, eager) <= 2 * own + 1e-5 * scale


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("guided", [False, True])
def test_emulated_and_captured_loops_both_track_the_reference(eta, guided):
    """cuda_graph="emulate" runs the captured loop's code uncaptured: what the CPU suite tests
    (tests/test_emulated_loop.py) is what a GPU replays."""
    model = _model(num_classes=10 if guided else None)
    x_T = _x_T()
    kw = {}
    if guided:
        null = torch.full((2,), 10, device="cuda")
        kw = dict(model_kwargs={"class_labels": torch.tensor([1, 2], device="cuda")}, guidance_scale=3.0, uncond_kwargs={"class_labels": null})
    graph = FastSampler(model, SCHEDULE, steps=10, eta=eta).sample(x_T, generator=_gen(1), **kw)
    emulated = FastSampler(model, SCHEDULE, steps=10, eta=eta, cuda_graph="emulate").sample(x_T, generator=_gen(1), **kw)
    ref = ReferenceSampler(model, SCHEDULE, steps=10, eta=eta).sample(x_T, generator=_gen(1), **kw)
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=10, eta=eta).sample(x_T.double(), generator=_gen(1), **kw)
    own = max_err(ref, ref64)
    for got in (graph, emulated):
        assert max_err(got, ref64) <= 2 * own + 1e-5 * (1 + ref64.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_graph_tracks_the_reference(dtype):
    model = _model()
    x_T = _x_T()
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=20).sample(x_T.double())
    lp_model = copy.deepcopy(model).to(dtype)
    ref_lp = ReferenceSampler(lambda x, t: lp_model(x.to(dtype), t).float(), SCHEDULE, steps=20).sample(x_T)
    fast = FastSampler(model, SCHEDULE, steps=20, dtype=dtype).sample(x_T)
    assert fast.dtype == dtype
    assert max_err(fast, ref64) <= 2 * max_err(ref_lp, ref64) + torch.finfo(dtype).eps * ref64.abs().max().item()


def test_step_and_loop_graphs_agree():
    model = _model()
    x_T = _x_T()
    a = FastSampler(model, SCHEDULE, steps=10, eta=0.5, graph_mode="step").sample(x_T, generator=_gen(3))
    b = FastSampler(model, SCHEDULE, steps=10, eta=0.5, graph_mode="loop").sample(x_T, generator=_gen(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callers_generator_advances_as_in_the_reference():
    model = _model()
    g1, g2 = _gen(5), _gen(5)
    FastSampler(model, SCHEDULE, steps=10, eta=1.0).sample(_x_T(), generator=g1)
    ReferenceSampler(model, SCHEDULE, steps=10, eta=1.0).sample(_x_T(), generator=g2)
    torch.testing.assert_close(torch.randn(4, generator=g1, device="cuda"), torch.randn(4, generator=g2, device="cuda"))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_cpu_generator_keeps_the_captured_loop_and_the_reference_images(eta):
    """diffusers recommends CPU generators for reproducible images: x_T and the step noise
    come from it in the reference's order (drawn on the host, copied in once per run) and
    the graph is kept."""
    model = _model()
    sampler = FastSampler(model, SCHEDULE, steps=10, eta=eta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got = sampler.sample(batch_size=2, generator=torch.Generator().manual_seed(3))
    (loop,) = sampler._graphs._entries.values()
    assert loop.graphs and sampler._graphs.disabled_reason is None
    ref = ReferenceSampler(model, SCHEDULE, steps=10, eta=eta).sample(batch_size=2, generator=torch.Generator().manual_seed(3))
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=10, eta=eta)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).cuda().double()
    ref64 = ref64.sample(x_T, generator=_cpu_after_x_T(3, x_T.shape))
    assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())
    again = sampler.sample(batch_size=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def _cpu_after_x_T(seed, shape):
    """A CPU generator seeded `seed` that has drawn x_T of `shape` (what sample(batch_size=...) draws first)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g


def test_no_host_sync_inside_the_replayed_loop():
    model = _model()
    sampler = FastSampler(model, SCHEDULE, steps=20, eta=0.5)
    x_T = _x_T()
    sampler.sample(x_T, generator=_gen(0))  # capture (warm-up may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.sample(x_T, generator=_gen(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_memory_is_stable_over_100_calls():
    model = _model()
    sampler = FastSampler(model, SCHEDULE, steps=10, eta=0.5)
    x_T = _x_T()
    for _ in range(3):
        sampler.sample(x_T, generator=_gen(0))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        out = sampler.sample(x_T, generator=_gen(0))
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before


def test_batch_change_recaptures_and_cache_is_bounded():
    model = _model()
    sampler = FastSampler(model, SCHEDULE, steps=5, graph_cache_size=2)
    for b in (1, 2, 3, 2):
        out = sampler.sample(_x_T(batch=b))
        assert out.shape[0] == b
    assert len(sampler._graphs) == 2


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("lean", [True, False])
def test_guided_graph_replays_new_labels_and_scale_without_recapture(eta, lean):
    """The conditioning tensors and w are static buffers of the captured graph: new values of
    the same shapes replay it, and give the reference's samples for them."""
    model = _model(num_classes=10)
    model64 = copy.deepcopy(model).double()
    x_T = _x_T()
    sampler = FastSampler(model, SCHEDULE, steps=10, eta=eta, lean=lean)
    null = torch.full((2,), 10, device="cuda")
    for labels, w in (([1, 2], 2.0), ([7, 3], 5.0), ([7, 3], 2.0)):
        kw = dict(model_kwargs={"class_labels": torch.tensor(labels, device="cuda")}, guidance_scale=w, uncond_kwargs={"class_labels": null})
        got = sampler.sample(x_T, generator=_gen(1), **kw)
        ref = ReferenceSampler(model, SCHEDULE, steps=10, eta=eta).sample(x_T, generator=_gen(1), **kw)
        ref64 = ReferenceSampler(model64, SCHEDULE, steps=10, eta=eta).sample(x_T.double(), generator=_gen(1), **kw)
        assert max_err(got, ref64) <= 2 * max_err(ref, ref64) + 1e-5 * (1 + ref64.abs().max().item())
    assert len(sampler._graphs) == 1 and sampler._graphs.disabled_reason is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.sample(x_T, generator=_gen(0), **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_uncapturable_model_falls_back_with_one_warning():
    """A host sync in the model: the warm-up's sync check finds it, before any capture."""
    model = _model()

    def syncing(x, t):
        if x.abs().max().item() > 1e9:  # a host sync: not allowed while capturing
            return x
        return model(x, t)

    x_T = _x_T()
    sampler = FastSampler(syncing, SCHEDULE, steps=5)
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph \\(a step synchronizes with the host"):
        a = sampler.sample(x_T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = sampler.sample(x_T)
    ref = ReferenceSampler(model, SCHEDULE, steps=5).sample(x_T)
    assert max_err(a, ref) <= 1e-4 * (1 + ref.abs().max().item())
    torch.testing.assert_close(a, b)


def test_a_capture_that_fails_leaves_the_process_able_to_sample_and_capture():
    """A model that runs eagerly but breaks its capture (a host sync only while capturing, so
    the warm-up's sync check cannot see it): the capture fails, and then the eager fallback
    draws from the default CUDA generator (eta > 0, no generator) and a new sampler captures.
    In torch <= 2.12 a failed capture left the generators in capture mode and the allocator
    routing to the graph's pool (restore_after_failed_capture undoes both)."""
    model = _model()

    def breaks_capture(x, t):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return model(x, t)

    x_T = _x_T()
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph"):
        got = FastSampler(breaks_capture, SCHEDULE, steps=5, eta=1.0).sample(x_T)
    assert got.isfinite().all()
    torch.randn(4, device="cuda")  # the default generator left capture mode
    sampler = FastSampler(model, SCHEDULE, steps=5, eta=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = sampler.sample(x_T, generator=_gen(1))
    (loop,) = sampler._graphs._entries.values()
    assert loop.graphs
    ref = ReferenceSampler(model, SCHEDULE, steps=5, eta=1.0).sample(x_T, generator=_gen(1))
    assert max_err(a, ref) <= 1e-4 * (1 + ref.abs().max().item())


def test_fast_rng_has_the_right_moments():
    """In-kernel Philox noise is not the reference's stream; check it by moments. With a
    model that predicts eps = 0 from x_T = 0, the step 500 -> 100 leaves sigma * z, and the
    last step (sigma = 0) divides by sqrt(alpha_100): out = sigma * z / sqrt(alpha_100)."""
    zero_eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    sampler = FastSampler(zero_eps, SCHEDULE, steps=2, eta=1.0, fast_rng=True, skip=[100, 500])
    out = sampler.sample(torch.zeros(64, 3, 64, 64, device="cuda"), generator=_gen(9))
    z = out * SCHEDULE.alpha(100) ** 0.5 / SCHEDULE.sigma(500, 100, 1.0)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.05


def test_eager_cuda_path_uses_the_native_op():
    from ddim_fast.ops.extension import has_native_kernel

    if not has_native_kernel("ddim_step", "cuda"):
        pytest.skip("the extension was built without CUDA kernels")
    model = _model()
    x_T = _x_T()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        FastSampler(model, SCHEDULE, steps=3, cuda_graph=False).sample(x_T)
    names = {e.name for e in prof.events()}
    assert "ddim_fast::ddim_step" in names
