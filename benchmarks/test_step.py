"""One sampling step: its time and what it dispatches, for the reference loop, FastSampler's
fused copy of the model (lean=False: the path before the lean step) and its default, the
lean model (models/lean.py), in fp32 and bf16.

    pytest benchmarks/test_step.py --benchmark-only

Each benchmark times sample() with S = 10; extra_info holds ms_per_step (the median over
10) and ops_per_step (non-view ops one step dispatches, counted once per implementation
with ddim_fast.apps.census.opcount at batch 1: each is a kernel launch on a GPU). Cases: on a CPU
the embedded digits UNet (batch 1, 16) and the CIFAR-10 layout at ch=64 (batch 1, 8); on
a GPU the CIFAR-10 UNet (batch 1, 64).
"""

import functools

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule
from ddim_fast.apps.census.opcount import ops_per_step

from ._models import get_model, in_dtype, record_flops_per_step, sample_shape, timed

SCHEDULE = Schedule.linear()
STEPS = 10
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [("cifar10", 1), ("cifar10", 64)] if CUDA else [("digits", 1), ("digits", 16), ("cifar10-ch64", 1), ("cifar10-ch64", 8)]
IMPLS = [("reference", "fp32"), ("fused", "fp32"), ("lean", "fp32"), ("fused", "bf16"), ("lean", "bf16")]
# torch.compile rows, timed only with --benchmark-only --ddim-full (each compile takes 10-90 s on 2 cores):
# FastSampler(compile=True) and the peers a user would pick instead, the reference loop over
# torch.compile(model) in the same dtype ("reduce-overhead" captures CUDA graphs: GPU only).
# In the order a time-limited run (--ddim-compile-budget) should spend its compiles: the
# likeliest best peer first ("reduce-overhead" on a GPU, where it was the fastest in the
# H100 run; "default" on a CPU), then ours, then the other modes.
PEER_MODES = ["reduce-overhead", "default", "max-autotune-no-cudagraphs"] if CUDA else ["default", "max-autotune-no-cudagraphs"]
_peers = lambda modes: [(f"peer-{m}", d) for m in modes for d in ("fp32", "bf16")]  # noqa: E731
COMPILED = _peers(PEER_MODES[:1]) + [("lean-compile", d) for d in ("fp32", "bf16")] + _peers(PEER_MODES[1:])


def _sampler(impl, dtype, model, steps, cuda_graph=True):
    if impl == "reference":
        return ReferenceSampler(model, SCHEDULE, steps=steps)
    if impl.startswith("peer-"):
        return ReferenceSampler(torch.compile(in_dtype(model, dtype), mode=impl[len("peer-"):]), SCHEDULE, steps=steps)
    return FastSampler(model, SCHEDULE, steps=steps, dtype=dtype, lean=impl.startswith("lean"), cuda_graph=cuda_graph, compile=impl.endswith("-compile"))


@functools.lru_cache(maxsize=None)
def _ops(impl, dtype, model_name):
    model = get_model(model_name, DEVICE)
    x = torch.randn((1, *sample_shape(model)), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # the eager loop: a replayed CUDA graph dispatches nothing to count (it launches the same kernels)
    per_step, _ = ops_per_step(lambda s: _sampler(impl, dtype, model, s, cuda_graph=False), x)
    return sum(per_step.values())


@pytest.mark.parametrize("model_name, batch", CASES, ids=[f"{m}-b{b}" for m, b in CASES])
@pytest.mark.parametrize("impl, dtype", IMPLS + COMPILED, ids=[f"{i}-{d}" for i, d in IMPLS + COMPILED])
def test_step(benchmark, bench_config, compile_budget, model_name, batch, impl, dtype):
    compiled = (impl, dtype) in COMPILED
    if compiled:
        compile_budget.admit_compiled(benchmark, f"step-{model_name}-b{batch}: {impl}-{dtype}", checked_by="tests/test_compile.py")
    model = get_model(model_name, DEVICE)
    sampler = _sampler(impl, dtype, model, STEPS)
    x_T = torch.randn((batch, *sample_shape(model)), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    benchmark.group = f"step-{model_name}-b{batch}"
    benchmark.extra_info.update(impl=impl, dtype=dtype, model=model_name, batch=batch, steps=STEPS, device=DEVICE, kind="step")

    def run():
        out = sampler.sample(x_T)
        if CUDA:
            torch.cuda.synchronize()
        return out

    if not benchmark.disabled:
        compile_budget.first_call(benchmark, run, compiled)  # preparation (the lean model, tables, oneDNN primitives, a compile, a CUDA graph) off the clock
        if not compiled:  # a compiled model dispatches inside one opaque region: nothing to count
            benchmark.extra_info["ops_per_step"] = _ops(impl, dtype, model_name)
    record_flops_per_step(benchmark, (model_name, batch), model, x_T)
    # the first call was a whole one (with the preparation): without a compile, an estimate of the next
    call_s = None if compiled else benchmark.extra_info.get("first_call_s")
    out = timed(benchmark, run, STEPS, full_matrix=bench_config["full_matrix"], call_s=call_s)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3 / STEPS
    assert out.shape == x_T.shape and torch.isfinite(out).all()
