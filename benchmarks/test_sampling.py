"""Wall-clock time of sampling: the reference loop against FastSampler, for each S.

    pytest benchmarks/test_sampling.py --benchmark-only

Implementations (the benchmark name holds one of them):
  reference  ReferenceSampler, fp32: the plain eager loop of the official DDIM code
  fast       FastSampler with its defaults (fp32; a CUDA graph on GPU)
  fast-bf16  FastSampler(dtype="bf16") (GPU)
  fast-compile  FastSampler(compile=True): Inductor inside our loop (and our CUDA graph)
  peer-<mode>   the peer a user would pick instead: ReferenceSampler over
             torch.compile(model, mode=<mode>) in the same dtype, for the modes "default",
             "max-autotune-no-cudagraphs" and (GPU) "reduce-overhead"

fast-compile and the peers are timed only with --benchmark-only (a compile takes 10-90 s), and
of them only the likeliest best peer ("default" on a CPU, at the smallest batch there;
"reduce-overhead" on a GPU) without --ddim-full (benchmarks/conftest.py);
extra_info["first_call_s"] is the warm-up's wall time (the compile, or oneDNN's set-up).

Groups pair the implementations for one (model, S, batch), so the table shows them side
by side. Every timed call ends with a device synchronisation. Rounds: _models.timed (S = 1000:
two, one in the default CPU run).
"""

import functools

import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule

from ._models import get_model, in_dtype, record_flops_per_step, sample_shape, sampling_call, timed, warm_up_estimate

SCHEDULE = Schedule.linear()


def _impls(device):
    dtypes = ("fp32", "bf16") if device == "cuda" else ("fp32",)
    modes = ("reduce-overhead", "default", "max-autotune-no-cudagraphs") if device == "cuda" else ("default", "max-autotune-no-cudagraphs")
    return [("reference", "fp32")] + [("fast", d) for d in dtypes] + [("fast-compile", d) for d in dtypes] + [(f"peer-{m}", d) for m in modes for d in dtypes]


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    cuda = torch.cuda.is_available()
    steps = [int(v) for v in opt("--ddim-steps").split(",")]
    batches = [int(v) for v in (opt("--ddim-batch") or ("1,64" if cuda else "1,16")).split(",")]
    model = opt("--ddim-model") or ("cifar10" if cuda else "digits")
    impls = _impls("cuda" if cuda else "cpu")
    metafunc.parametrize("model", [model])
    metafunc.parametrize("batch", batches, ids=lambda b: f"b{b}")
    metafunc.parametrize("steps", steps, ids=lambda s: f"S{s}")
    metafunc.parametrize("impl, dtype", impls, ids=[f"{i}-{d}" if i != "reference" else i for i, d in impls])


@functools.lru_cache(maxsize=None)
def _compiled(name, device, mode, dtype):
    return torch.compile(in_dtype(get_model(name, device), dtype), mode=mode)


def _sampler(impl, dtype, model, steps, bench_config):
    if impl == "reference":
        return ReferenceSampler(model, SCHEDULE, steps=steps)
    if impl.startswith("peer-"):
        return ReferenceSampler(_compiled(bench_config["model"], bench_config["device"], impl[len("peer-"):], dtype), SCHEDULE, steps=steps)
    return FastSampler(model, SCHEDULE, steps=steps, dtype=dtype, compile=impl == "fast-compile")


def test_sample(benchmark, bench_config, compile_budget, impl, dtype, model, batch, steps):
    compiled = impl == "fast-compile" or impl.startswith("peer-")
    if compiled:
        compile_budget.admit_compiled(benchmark, f"sample-{model}-S{steps}-b{batch}: {impl}-{dtype}", checked_by="tests/test_compile.py")
    device = bench_config["device"]
    net = get_model(model, device)
    sampler = _sampler(impl, dtype, net, steps, bench_config)
    g = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn((batch, *sample_shape(net)), generator=g, device=device)
    benchmark.group = f"sample-{model}-S{steps}-b{batch}"
    benchmark.extra_info.update(impl=impl, dtype=dtype, steps=steps, batch=batch, model=model, device=device)

    run = sampling_call(sampler, x_T)
    call_s = None
    if not benchmark.disabled:
        # warm-up outside the clock: the graph capture (fast on GPU) or a short run
        # (oneDNN primitives, torch.compile) of the same model
        if (impl.startswith("fast") and device == "cuda") or impl == "fast-compile":
            warm_up = run  # fast-compile: the sampler's own prepared model is the one compiled
        else:
            warm_up = lambda: _sampler(impl, dtype, net, 2, bench_config).sample(x_T)  # noqa: E731
        compile_budget.first_call(benchmark, warm_up, compiled)
        if warm_up is not run and not compiled:  # a 2-step warm-up without a compile: the model's steps
            call_s = warm_up_estimate(benchmark, 2, steps)
    record_flops_per_step(benchmark, (model, batch), net, x_T)
    out = timed(benchmark, run, steps, full_matrix=bench_config["full_matrix"], call_s=call_s)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
