"""Wall-clock time of DDIM and DPM-Solver++(2M) at the S each needs for a given quality.

    pytest benchmarks/test_solvers.py --benchmark-only

One group per (model, batch) holds FastSampler with solver="ddim" at S = 10, 20, 50 and
solver="dpmpp_2m" at S = 10, 20 (trailing grids, η = 0, fp32; a CUDA graph on GPU), so the
table compares them inside one run. README's solver table says how far from the ODE's
solution each (solver, S) lands on the digits model (benchmarks/solver_quality.py): read
this group's times at the rows of equal distance (ms per sample at equal quality).
"""

import torch

from ddim_fast import FastSampler, Schedule

from ._models import get_model, record_flops_per_step, sample_shape, sampling_call

SCHEDULE = Schedule.linear()
RUNS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpmpp_2m", 10), ("dpmpp_2m", 20)]


def pytest_generate_tests(metafunc):
    if "solver" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    cuda = torch.cuda.is_available()
    batches = [int(v) for v in (opt("--ddim-batch") or ("1,64" if cuda else "1,16")).split(",")]
    metafunc.parametrize("model", [opt("--ddim-model") or ("cifar10" if cuda else "digits")])
    metafunc.parametrize("batch", batches, ids=lambda b: f"b{b}")
    metafunc.parametrize("solver, steps", RUNS, ids=[f"{solver}-S{steps}" for solver, steps in RUNS])


def test_solver(benchmark, bench_config, solver, steps, model, batch):
    device = bench_config["device"]
    net = get_model(model, device)
    sampler = FastSampler(net, SCHEDULE, steps=steps, skip="trailing", solver=solver)
    x_T = torch.randn((batch, *sample_shape(net)), generator=torch.Generator(device=device).manual_seed(0), device=device)
    benchmark.group = f"solvers-{model}-b{batch}"
    benchmark.extra_info.update(solver=solver, steps=steps, batch=batch, model=model, device=device, dtype="fp32")

    run = sampling_call(sampler, x_T)
    if not benchmark.disabled:
        run()  # outside the clock: the capture on a GPU, oneDNN's set-up on a CPU
    record_flops_per_step(benchmark, (model, batch), net, x_T)
    out = benchmark(run)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
