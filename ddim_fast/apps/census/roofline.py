"""A roofline MODEL of one sampling step on a named GPU, from a census of its ops
(apps/opcount.census_per_step): an estimate to tell which op to fuse next, not a measurement.

    from ddim_fast.apps.census.roofline import roofline, format_roofline
    estimate = roofline(census, gpu="H200", dtype="bf16")
    print(format_roofline(estimate, top=15))

The model, per call of an op (one GPU kernel per op: an assumption, see LAUNCH_US):

    time = max(flops / peak, (bytes read + bytes written) / bandwidth) + launch

and the step's time is the sum over its calls (kernels run one after another, none
overlapping). Calls that move no bytes and do no FLOPs (allocations, metadata) launch
nothing and cost nothing. FLOPs count a multiply-add as 2 (torch.utils.flop_counter's
convention, which the peaks share); bytes are counted once per distinct tensor of a call, so
the model assumes nothing comes from the L2 cache between kernels (60 MB on the H200: a
small step's activations fit, so the memory term is pessimistic at batch 1).

Peaks and bandwidth: datasheet numbers for each GPU, and measured ones where a GPU of ours
measured them (GPU-NOTES.md); numbers="measured" (the default) takes a measured number where
there is one and the datasheet's otherwise, and the estimate says which it took.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...core.options import check_dtype

# Each kernel's fixed cost inside a CUDA graph: on Hopper about 1-2 us per kernel (the
# graph's launch plus the drain and fill of the GPU between two dependent kernels); an
# assumption, not measured here. The H100 measured ~3.4 us per kernel at batch 1 fp32
# (GPU-NOTES.md), which includes the small kernels' own work.
LAUNCH_US = 1.5

# Dense (no sparsity) peak FLOP/s per dtype from NVIDIA's H100 SXM and H200 SXM datasheets:
# bf16 and fp16 on the tensor cores (half the "with sparsity" 1,979 TFLOP/s), fp32 on the
# CUDA cores (an fp32 matmul with TF32 off, PyTorch's default for matmuls; cuDNN's
# convolutions take TF32 by default and may beat it). The two GPUs share the compute die.
_HOPPER_PEAK = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}


@dataclasses.dataclass(frozen=True)
class GPU:
    """What the model knows of one GPU: datasheet numbers, and measured ones where we have them."""

    name: str
    peak_flops: dict  # dtype -> dense FLOP/s, datasheet
    bandwidth: float  # bytes/s of HBM (read + written), datasheet
    measured_flops: dict  # dtype -> FLOP/s measured on our machine
    measured_bandwidth: Optional[float]  # bytes/s, a device-to-device copy counting read + written
    measured_where: str  # where the measured numbers come from


GPUS = {
    "h100": GPU(
        name="H100 SXM",
        peak_flops=_HOPPER_PEAK,
        bandwidth=3.35e12,
        measured_flops={},  # no matmul measured on the H100
        measured_bandwidth=3.0e12,
        measured_where="GPU-NOTES.md: the H100 copies about 3.0 TB/s (bytes read and written)",
    ),
    "h200": GPU(
        name="H200",
        peak_flops=_HOPPER_PEAK,
        bandwidth=4.8e12,
        # bf16 8192^3 matmul: 769-798 TFLOP/s; the best run, since a roofline is a bound
        measured_flops={torch.bfloat16: 798e12},
        measured_bandwidth=4.3e12,
        measured_where="GPU-NOTES.md: bf16 8192^3 matmul 769-798 TFLOP/s, device-to-device copy about 4.3 TB/s",
    ),
}
NUMBERS = ("measured", "datasheet")


@dataclasses.dataclass(frozen=True)
class OpEstimate:
    """One op's share of the modelled step: its census per step and its modelled time."""

    op: str
    count: float  # calls per step
    kernels: float  # calls that launch a kernel (move bytes or do FLOPs)
    bytes_read: float
    bytes_written: float
    flops: float
    ms: float  # modelled milliseconds per step
    bound: str  # which term of the model dominates: "compute", "memory", "launch" ("none": no kernel)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The modelled step: totals and one row per op, slowest first."""

    gpu: str
    dtype: torch.dtype
    peak_flops: float
    bandwidth: float
    flops_source: str  # "measured" or "datasheet"
    bandwidth_source: str
    launch_us: float
    ms: float  # the model's time of one step
    compute_ms: float  # all FLOPs at the peak, nothing else
    memory_ms: float  # all bytes at the bandwidth, nothing else
    launch_ms: float  # all kernels' fixed cost, nothing else
    kernels: float
    flops: float
    bytes: float
    rows: list


def gpu_spec(gpu: str) -> GPU:
    """The GPU named "H200", "h100", "H100 SXM", ... (case and spaces aside)."""
    key = gpu.lower().replace(" ", "").replace("sxm", "")
    if key not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {sorted(GPUS)}")
    return GPUS[key]


def gpu_numbers(gpu: str, dtype, numbers: str = "measured") -> tuple:
    """(peak FLOP/s, bandwidth bytes/s, where the peak came from, where the bandwidth came from)."""
    spec = gpu_spec(gpu)
    if numbers not in NUMBERS:
        raise ValueError(f"unknown numbers {numbers!r}; expected one of {NUMBERS}")
    dtype = check_dtype(dtype)
    measured = numbers == "measured"
    peak, peak_source = spec.peak_flops[dtype], "datasheet"
    if measured and dtype in spec.measured_flops:
        peak, peak_source = spec.measured_flops[dtype], "measured"
    bandwidth, bandwidth_source = spec.bandwidth, "datasheet"
    if measured and spec.measured_bandwidth is not None:
        bandwidth, bandwidth_source = spec.measured_bandwidth, "measured"
    return peak, bandwidth, peak_source, bandwidth_source


def _calls(row: dict) -> list:
    """[(calls per step, bytes read, bytes written, flops) per call], from the census's
    per-call signatures, or, for a census without them, `count` equal calls."""
    if "calls" in row:
        return list(row["calls"])
    count = row["count"]
    if count == 0:
        return []
    return [(count, row["bytes_read"] / count, row["bytes_written"] / count, row["flops"] / count)]


def roofline(census: dict, gpu: str = "H200", dtype="bf16", *, numbers: str = "measured", launch_us: float = LAUNCH_US) -> Roofline:
    """The roofline MODEL of one step from census {op: {count, bytes_read, bytes_written,
    flops[, calls]}} per step (opcount.census_per_step): per call
    max(flops / peak, bytes / bandwidth) + launch_us, summed. dtype picks the peak
    (the dtype the step runs in); numbers: "measured" or "datasheet" (see the module doc)."""
    peak, bandwidth, peak_source, bandwidth_source = gpu_numbers(gpu, dtype, numbers)
    launch_s = launch_us * 1e-6
    rows = []
    for op, row in census.items():
        compute_s = memory_s = fixed_s = modelled_s = kernels = 0.0
        for calls, bytes_read, bytes_written, flops in _calls(row):
            if bytes_read + bytes_written == 0 and flops == 0:
                continue  # an allocation or a metadata call: no kernel
            call_compute_s = flops / peak
            call_memory_s = (bytes_read + bytes_written) / bandwidth
            modelled_s += calls * (max(call_compute_s, call_memory_s) + launch_s)
            compute_s += calls * call_compute_s
            memory_s += calls * call_memory_s
            fixed_s += calls * launch_s
            kernels += calls
        terms = {"compute": compute_s, "memory": memory_s, "launch": fixed_s}
        bound = max(terms, key=terms.get) if modelled_s > 0 else "none"
        rows.append(OpEstimate(
            op=op,
            count=row["count"],
            kernels=kernels,
            bytes_read=row["bytes_read"],
            bytes_written=row["bytes_written"],
            flops=row["flops"],
            ms=modelled_s * 1e3,
            bound=bound,
        ))
    rows.sort(key=lambda r: (-r.ms, r.op))
    flops = sum(r.flops for r in rows)
    moved = sum(r.bytes_read + r.bytes_written for r in rows)
    kernels = sum(r.kernels for r in rows)
    return Roofline(
        gpu=gpu_spec(gpu).name,
        dtype=check_dtype(dtype),
        peak_flops=peak,
        bandwidth=bandwidth,
        flops_source=peak_source,
        bandwidth_source=bandwidth_source,
        launch_us=launch_us,
        ms=sum(r.ms for r in rows),
        compute_ms=flops / peak * 1e3,
        memory_ms=moved / bandwidth * 1e3,
        launch_ms=kernels * launch_s * 1e3,
        kernels=kernels,
        flops=flops,
        bytes=moved,
        rows=rows,
    )


def format_roofline(estimate: Roofline, top: int = 15) -> str:
    """The estimate as text: what the model assumes, the step's totals, the `top` slowest ops."""
    e = estimate
    not_compute_ms = sum(r.ms for r in e.rows if r.bound != "compute")
    lines = [
        f"roofline MODEL of one step on the {e.gpu}, {str(e.dtype).replace('torch.', '')} (an estimate, not a measurement):",
        f"  per kernel max(flops / {e.peak_flops / 1e12:.1f} TFLOP/s [{e.flops_source}], bytes / {e.bandwidth / 1e12:.2f} TB/s [{e.bandwidth_source}]) + {e.launch_us:g} us launch",
        f"  {e.ms:.3f} ms per step: {e.kernels:.0f} kernels; FLOPs alone {e.compute_ms:.3f} ms, bytes alone {e.memory_ms:.3f} ms, launches alone {e.launch_ms:.3f} ms",
        f"  ops bound by memory or launches (the candidates to fuse): {not_compute_ms:.3f} ms ({not_compute_ms / e.ms if e.ms else 0.0:.0%})",
        f"  {'op':<44} {'calls':>6} {'GB read':>8} {'GB written':>10} {'GFLOP':>8} {'ms':>7} {'share':>6}  bound",
    ]
    for r in e.rows[:top]:
        share = r.ms / e.ms if e.ms else 0.0
        lines.append(f"  {r.op:<44} {r.count:>6.1f} {r.bytes_read / 1e9:>8.4f} {r.bytes_written / 1e9:>10.4f} {r.flops / 1e9:>8.2f} {r.ms:>7.4f} {share:>6.1%}  {r.bound}")
    if len(e.rows) > top:
        rest = e.rows[top:]
        lines.append(f"  ... {len(rest)} more ops, {sum(r.ms for r in rest):.4f} ms")
    return "\n".join(lines)


__all__ = ["GPU", "GPUS", "LAUNCH_US", "NUMBERS", "OpEstimate", "Roofline", "gpu_spec", "gpu_numbers", "roofline", "format_roofline"]
