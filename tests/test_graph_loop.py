"""The captured loop's kernels and its cache, checked on the CPU.

The in-kernel noise and the advance kernel under Triton's interpreter; the cache's keys,
bound and fallbacks with a stand-in for the captured loop. The loop itself, emulated, is in
test_emulated_loop.py; the CUDA-graph runs in test_cuda.py (skipped without a GPU).
"""

import math
import warnings

import pytest
import torch

from ddim_fast import FastSampler, Schedule
from ddim_fast.core.plan import NUM_COEFS, SIGMA, SQRT_ALPHA_T
from ddim_fast.sampling import graph as G

from .conftest import requires_triton_interpreter, tiny_unet

SCHEDULE = Schedule.linear()


@requires_triton_interpreter
def test_in_kernel_philox_noise_has_unit_moments():
    from ddim_fast.kernels import ddim_step as k

    n = 1 << 16
    x = torch.zeros(n)
    m = torch.zeros(n)
    out = torch.empty(n).fill_(float("nan"))
    table = torch.zeros(2, NUM_COEFS)  # out = sigma * z
    table[:, SQRT_ALPHA_T] = 1.0
    table[:, SIGMA] = 1.0
    seed = torch.tensor([1234], dtype=torch.int64)
    k.launch(x, m, table, torch.tensor([0], dtype=torch.int32), out, prediction=0, seed=seed, has_xt=False)
    z0 = out.clone()
    k.launch(x, m, table, torch.tensor([1], dtype=torch.int32), out, prediction=0, seed=seed, has_xt=False)
    z1 = out.clone()
    for z in (z0, z1):
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.std().item() - 1) < 0.02
        assert abs(((z**4).mean() - 3).item()) < 0.1  # Gaussian kurtosis
    assert abs(torch.corrcoef(torch.stack([z0, z1]))[0, 1].item()) < 0.02  # each step its own stream


@requires_triton_interpreter
def test_advance_kernel_moves_counter_and_timesteps():
    from ddim_fast.kernels import ddim_step as k

    t_table = torch.tensor([[9, 9, 9], [5, 5, 5], [1, 1, 1]])
    t_buf = t_table[0].clone()
    step = torch.zeros(1, dtype=torch.int32)
    k.advance(step, t_table, t_buf)
    assert step.item() == 1 and t_buf.tolist() == [5, 5, 5]
    k.advance(step, t_table, t_buf)
    assert step.item() == 2 and t_buf.tolist() == [1, 1, 1]


class _FakeLoop:
    made = 0

    generators = []

    def __init__(self, spec, model, x, cond=None, noise_device=None, noise_dtype=None):
        type(self).made += 1
        self.x = x

    def warm_up(self):
        return None

    def capture(self, mode, pool):
        pass

    def run(self, x, generator, cond=None):
        return x + 1


def test_graph_cache_keys_and_bound(monkeypatch):
    monkeypatch.setattr(G, "CapturedLoop", _FakeLoop)
    monkeypatch.setattr(G.torch.cuda, "graph_pool_handle", lambda: "pool")
    _FakeLoop.made = 0
    sampler = FastSampler(tiny_unet(), SCHEDULE, steps=2)
    cache = G.GraphCache(2)
    x1, x2, x3 = torch.zeros(1, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8)
    cache.run(sampler.spec("sampling"), sampler.prepared_model, x1, None)
    cache.run(sampler.spec("sampling"), sampler.prepared_model, x1, None)
    assert _FakeLoop.made == 1  # same key: reused
    cache.run(sampler.spec("encoding"), sampler.prepared_model, x1, None)  # encoding is another key
    cache.run(sampler.spec("sampling"), sampler.prepared_model, x2, None)  # batch change: recapture, evicts the LRU
    assert _FakeLoop.made == 3 and len(cache) == 2
    cache.run(sampler.spec("sampling"), sampler.prepared_model, x1, None)  # was evicted
    assert _FakeLoop.made == 4
    cache.run(sampler.spec("sampling"), sampler.prepared_model, x3.to(torch.bfloat16), None)
    assert len(cache) == 2
    x4 = torch.zeros(2, 3, 8, 8)
    spec = sampler.spec("sampling")
    assert cache.key(spec, x4) != cache.key(spec, x4.contiguous(memory_format=torch.channels_last))
    assert cache.key(spec, x4) != cache.key(spec, x4.half())
    dpm = FastSampler(tiny_unet(), SCHEDULE, steps=2, solver="dpmpp_2m").spec("sampling")
    assert cache.key(spec, x4) != cache.key(dpm, x4)  # another solver: another loop


def test_graph_cache_falls_back_once_with_the_reason(monkeypatch):
    """A capture that fails: one warning with the reason, the eager loop from then on, and the
    process's CUDA graph state restored (restore_after_failed_capture, which only a GPU can
    run: test_cuda.py's failing-capture test runs it there) with the cache's pool and the
    loop's generators."""

    class Broken(_FakeLoop):
        generators = ["the loop's generator"]

        def capture(self, mode, pool):
            raise RuntimeError("operation not permitted when stream is capturing")

    restored = []
    monkeypatch.setattr(G, "CapturedLoop", Broken)
    monkeypatch.setattr(G, "restore_after_failed_capture", lambda device, pool, generators: restored.append((device, pool, generators)))
    monkeypatch.setattr(G.torch.cuda, "graph_pool_handle", lambda: "pool")
    sampler = FastSampler(tiny_unet(), SCHEDULE, steps=2)
    cache = G.GraphCache(2)
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph \\(RuntimeError: operation not permitted"):
        assert cache.run(sampler.spec("sampling"), sampler.prepared_model, torch.zeros(1, 1, 8, 8), None) is None
    assert restored == [(torch.device("cpu"), "pool", ["the loop's generator"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.run(sampler.spec("sampling"), sampler.prepared_model, torch.zeros(1, 1, 8, 8), None) is None  # no second warning
    assert len(restored) == 1


def test_a_host_sync_found_in_the_warm_up_falls_back_before_any_capture(monkeypatch):
    class Syncing(_FakeLoop):
        def warm_up(self):
            return "a step synchronizes with the host (called a synchronizing CUDA operation), which a CUDA graph cannot capture"

        def capture(self, mode, pool):
            raise AssertionError("no capture after the warm-up found a host sync")

    monkeypatch.setattr(G, "CapturedLoop", Syncing)
    monkeypatch.setattr(G.torch.cuda, "graph_pool_handle", lambda: "pool")
    sampler = FastSampler(tiny_unet(), SCHEDULE, steps=2)
    cache = G.GraphCache(2)
    with pytest.warns(RuntimeWarning, match="a step synchronizes with the host"):
        assert cache.run(sampler.spec("sampling"), sampler.prepared_model, torch.zeros(1, 1, 8, 8), None) is None


def test_graph_options_are_validated():
    with pytest.raises(ValueError, match="graph_mode must be one of"):
        FastSampler(tiny_unet(), SCHEDULE, graph_mode="whole")
    with pytest.raises(ValueError, match="graph_cache_size must be an int >= 1"):
        FastSampler(tiny_unet(), SCHEDULE, graph_cache_size=0)
    with pytest.raises(ValueError, match="fast_rng draws the noise inside the CUDA step kernel"):
        FastSampler(tiny_unet(), SCHEDULE, steps=2, eta=1.0, fast_rng=True).sample(batch_size=1)
