"""Models the benchmarks sample from (one instance per session and device)."""

import copy
import functools

import torch

from ddim_fast import ReferenceSampler, Schedule, UNet
from ddim_fast.apps.census.opcount import census_per_step, census_totals

SMALL = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=32)
# the CIFAR-10 UNet's layout at half its width: a CPU-sized stand-in for it
CIFAR10_CH64 = dict(ch=64, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, in_channels=3, resolution=32)


def sampling_call(sampler, x_T: torch.Tensor, **sample_kwargs):
    """run(): sampler.sample(x_T, **sample_kwargs), ending with a device synchronisation on CUDA
    (a timed call ends when the GPU's work does)."""

    def run():
        out = sampler.sample(x_T, **sample_kwargs)
        if x_T.is_cuda:
            torch.cuda.synchronize()
        return out

    return run


_FLOPS = {}


# A call at least this long gets pytest-benchmark's minimum of 3 rounds in the slow files
# (its 1 s max_time holds no more), after a calibration call that is not one of them.
THREE_ROUNDS_S = 1.0 / 3.0


def timed(benchmark, run, steps: int, *, full_matrix: bool, long: bool = False, call_s: float | None = None):
    """benchmark's result of run() for a whole S-step call: pytest-benchmark's own rounds for
    short calls; 3 rounds without its calibration call for S >= 100 (a call of 0.3-4 s on 2
    CPU cores) or a call estimated (call_s, from a warm-up) at THREE_ROUNDS_S or more, the
    rounds pytest-benchmark would run there, less a whole extra call; for S >= 1000 or a
    `long` row 2 rounds, 1 in the default CPU run (--ddim-full: 2), which is meant to finish
    within 8 minutes there."""
    if steps >= 1000 or long:
        rounds = 2 if full_matrix or torch.cuda.is_available() else 1
        return benchmark.pedantic(run, rounds=rounds, iterations=1)
    if steps >= 100 or (call_s is not None and call_s >= THREE_ROUNDS_S):
        return benchmark.pedantic(run, rounds=3, iterations=1)
    return benchmark(run)


def warm_up_estimate(benchmark, warm_up_steps: int, steps: int) -> float | None:
    """One S-step call's seconds from the warm-up of warm_up_steps that first_call timed, or
    None without one or below 1 s: the warm-up also prepares, and that time scaled by
    steps / warm_up_steps can make a call of 0.05 s look like one of 0.35 s (a 10-step row
    right after the process started), which would then lose pytest-benchmark's rounds."""
    warm_up_s = benchmark.extra_info.get("first_call_s")
    if warm_up_s is None:
        return None
    estimate = warm_up_s * steps / warm_up_steps
    return estimate if estimate >= 3 * THREE_ROUNDS_S else None


def flops_per_step(model, x_T: torch.Tensor, **sample_kwargs) -> float:
    """The FLOPs of one step of the reference loop on x_T (its model call, on the doubled
    batch when guided, and its update), as torch.utils.flop_counter counts them
    (apps/opcount.census_per_step): the work of the model, the same for every implementation."""
    census = census_per_step(lambda s: ReferenceSampler(model, Schedule.linear(), steps=s), x_T.float(), **sample_kwargs)
    return census_totals(census)["flops"]


def record_flops_per_step(benchmark, key, model, x_T: torch.Tensor, **sample_kwargs) -> None:
    """On a GPU, extra_info["flops_per_step"] (flops_per_step), which report.py divides by the
    time per step; counted once per key (model, batch, guided). CPU rows go without."""
    if not x_T.is_cuda or benchmark.disabled:
        return
    if key not in _FLOPS:
        _FLOPS[key] = flops_per_step(model, x_T, **sample_kwargs)
    benchmark.extra_info["flops_per_step"] = _FLOPS[key]


@functools.lru_cache(maxsize=None)
def get_model(name: str, device: str) -> torch.nn.Module:
    """"digits": the embedded model; "small": a small UNet of the standard architecture;
    "cifar10-ch64": the CIFAR-10 layout at ch=64; a preset ("cifar10", "celeba", "lsun")
    with random weights (speed does not depend on them)."""
    torch.manual_seed(0)
    if name == "digits":
        model = UNet.from_pretrained("digits")
    elif name == "small":
        model = UNet(**SMALL)
    elif name == "cifar10-ch64":
        model = UNet(**CIFAR10_CH64)
    else:
        model = UNet.from_config(name)
    return model.eval().to(device)


def sample_shape(model) -> tuple:
    return (model.in_channels, model.resolution, model.resolution)


def in_dtype(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """model itself for "fp32", else a copy in "bf16" or "fp16" (a compile peer's own weights)."""
    if dtype == "fp32":
        return model
    return copy.deepcopy(model).to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
