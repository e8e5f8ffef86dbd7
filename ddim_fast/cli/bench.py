"""`ddim-fast bench`: ReferenceSampler against FastSampler over S, one table."""

from __future__ import annotations

import statistics

import torch

from ..sampling.noise import indexed_noise
from .args import DTYPES, common_args, nonneg_int, positive_int, sampling_args
from .common import fast_sampler, image_shape, load_model, pick_device, progress_bar, reference_sampler, set_threads, time_run


def cmd_bench(args) -> int:
    set_threads(args)
    device = pick_device(args.device)
    model, schedule, desc, options = load_model(args.model, args.config, device, args)
    shape = image_shape(model)
    x_T = indexed_noise(args.seed, 0, args.batch_size, shape).to(device)
    x_ref = x_T.to(DTYPES[args.dtype])
    rows = []
    runs_per = args.warmup + args.repeats
    bar = progress_bar(args, 2 * runs_per * sum(args.steps), "bench", "step")
    for steps in args.steps:
        times = {}
        for name, sampler, x in (("reference", reference_sampler(model, schedule, args, options, steps=steps), x_ref), ("fast", fast_sampler(model, schedule, args, options, steps=steps), x_T)):
            ts = []
            for r in range(runs_per):
                g = torch.Generator(device=device).manual_seed(args.seed)
                _, t = time_run(device, sampler.sample, x, generator=g)
                if r >= args.warmup:
                    ts.append(t)
                bar.update(steps)
            times[name] = statistics.median(ts)
        rows.append((steps, times["reference"], times["fast"]))
    bar.close()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"{desc}, batch {args.batch_size}, eta {args.eta}, {device.type} {args.dtype}" + (f" ({threads} threads)" if threads else "") + f", torch {torch.__version__}; median of {args.repeats} runs after {args.warmup} warm-up")
    print()
    print("| S | reference ms | fast ms | fast/reference | speed-up |")
    print("|---|---|---|---|---|")
    for steps, r, f in rows:
        print(f"| {steps} | {1000 * r:.1f} | {1000 * f:.1f} | {f / r:.3f} | {r / f:.2f}x |")
    return 0


def add_parsers(sub) -> None:
    """The bench command."""
    b = sub.add_parser("bench", help="reference vs fast sampler: median ms per run over S", description="Time ReferenceSampler and FastSampler on one batch for each S; prints a markdown table.")
    common_args(b)
    sampling_args(b, steps_list=True)
    b.add_argument("--batch-size", type=positive_int, default=16, help="images per run (default 16)")
    b.add_argument("--repeats", type=positive_int, default=3, help="timed runs per cell (default 3)")
    b.add_argument("--warmup", type=nonneg_int, default=1, help="untimed runs first (default 1)")
    b.add_argument("--seed", type=nonneg_int, default=0)
    b.set_defaults(func=cmd_bench)
