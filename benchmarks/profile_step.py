"""Profile one sampling step on a CUDA GPU: kernels per step of each path, and the time a
replayed step spends outside the UNet.

    python benchmarks/profile_step.py [--model cifar10] [--batch 1] [--dtype bf16] [--json out.json]

- kernels per step: CUDA kernels launched by one eager step of the reference loop (plain
  UNet, the official arithmetic, fp32), of FastSampler's eager loop with the fused copy of
  the UNet (lean=False) and with the lean model (the default), in --dtype;
- overhead per replayed step: the median time of one replayed step graph (UNet + noise +
  fused step + advance) minus that of a graph holding the UNet forward alone.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet
from ddim_fast.models.fuse import fused_copy


def _kernels_in(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _graph_time_us(fn, reps: int = 200, generators=()) -> float:
    """Median µs of one replay of a graph of fn. Generators that fn draws from other than
    the default one must be registered with the graph (or capture fails)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    for gen in generators:
        g.register_generator_state(gen)
    with torch.cuda.graph(g):
        fn()
    for _ in range(10):
        g.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar10")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="FastSampler's sampling dtype")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = "cuda"
    schedule = Schedule.linear()
    model = UNet.from_config(args.model).eval().to(dev)
    shape = (args.batch, model.in_channels, model.resolution, model.resolution)
    x = torch.randn(shape, device=dev)
    t = torch.full((args.batch,), 500, device=dev, dtype=torch.long)
    res = {"device": torch.cuda.get_device_name(0), "model": args.model, "batch": args.batch, "dtype": args.dtype, "torch": torch.__version__}

    with torch.inference_mode():
        ref = ReferenceSampler(model, schedule, steps=1, eta=0.5)
        fused = FastSampler(model, schedule, steps=1, eta=0.5, cuda_graph=False, lean=False, dtype=args.dtype)
        lean = FastSampler(model, schedule, steps=1, eta=0.5, cuda_graph=False, dtype=args.dtype)
        for sampler in (ref, fused, lean):
            sampler.sample(x)
        res["kernels_per_step_reference"] = _kernels_in(lambda: ref.sample(x))
        res["kernels_per_step_fast_eager_fused"] = _kernels_in(lambda: fused.sample(x))
        res["kernels_per_step_fast_eager_lean"] = _kernels_in(lambda: lean.sample(x))
        fused_model, sites = fused_copy(model)
        res["fused_sites"] = sites
        res["kernels_unet_plain"] = _kernels_in(lambda: model(x, t))
        res["kernels_unet_fused"] = _kernels_in(lambda: fused_model(x, t))

        # a replayed step against a graph of the UNet alone
        sampler = FastSampler(model, schedule, steps=2, eta=0.5, dtype=args.dtype)
        loop = sampler.step_loop(x)
        fmodel = sampler.prepared_model(x.device)

        def unet_only():  # what the step graph runs of the model: from the table row, or from t
            if loop.table is not None:
                return fmodel.forward_rows(loop.x_buf, loop.table.index_select(0, loop.step)[0])
            return fmodel(loop.x_buf, loop.t_buf)

        res["us_unet_graph"] = _graph_time_us(unet_only)

        def one_step():
            loop.step.zero_()
            loop.one_step(True)

        # the loop draws its noise from its own generator: the graph must know it
        res["us_step_graph"] = _graph_time_us(one_step, generators=[loop.gen] if loop.gen is not None else [])
        res["us_overhead_per_step"] = res["us_step_graph"] - res["us_unet_graph"]
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
