"""What one sampling step dispatches: aten (and ddim_fast) ops per step, counted on any device.

    from ddim_fast.apps.census.opcount import ops_per_step
    per_step, not_channels_last = ops_per_step(lambda S: FastSampler(model, schedule, steps=S), x_T)

A TorchDispatchMode sees every op that reaches a kernel (views excepted: they launch
nothing); on a GPU each one is a kernel launch or more, so at small batch the count is the
step's time. Two sample() calls with different S, differenced over S, drop what runs once
per sample (the cast of x_T, tables, the result). Work moved into an opaque op still counts
as that op.

OpCounter takes an op for a view when its schema lets it return one: aten::to,
contiguous and reshape (which inference mode, where the samplers run, dispatches whole)
are not counted even when they copy.

The census (OpCensus, census_per_step) counts the same ops, and those copies, and per op
the bytes each call reads and writes and its FLOPs, on real tensors or on fake ones
(FakeTensorMode: a model built under the mode has shapes and no data, so a full-size UNet
is counted in seconds, nothing computed or allocated); apps/census/roofline.py turns it into a
modelled step time on a GPU.

    python -m ddim_fast.apps.census.opcount --model sd15 --gpu h200 --dtype bf16 --batch 1 --guided
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from typing import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count, shape_wrapper

from ...core.options import DTYPES

COPIES = frozenset({"aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"})

# Queries of a tensor's metadata, which reach a dispatch mode only for tensor subclasses
# (a FakeTensor's x.device is prim::device): no work, not counted.
METADATA_QUERIES = frozenset({
    "prim::device", "prim::layout", "aten::dim", "aten::size", "aten::sym_size", "aten::stride", "aten::sym_stride",
    "aten::numel", "aten::sym_numel", "aten::storage_offset", "aten::sym_storage_offset", "aten::is_contiguous",
    "aten::sym_is_contiguous", "aten::is_strides_like_format", "aten::is_non_overlapping_and_dense",
})


class OpCounter(TorchDispatchMode):
    """Non-view ops by name, and the ops that take or make a 4-d image tensor that is not
    channels_last (attention's (batch, heads, tokens, channels) operands are not images)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.not_channels_last = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func._schema.name not in METADATA_QUERIES:
            name = func.name()
            self.ops[name] += 1
            if "scaled_dot_product" not in name:
                leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
                if any(isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last) for t in leaves):
                    self.not_channels_last[name] += 1
        return out


def ops_per_step(sampler_for_steps: Callable[[int], object], x_T: torch.Tensor, steps: Sequence[int] = (2, 5), **sample_kwargs) -> tuple:
    """({op: count per step}, {op: uses of non-channels_last 4-d tensors per step}).

    sampler_for_steps(S) makes a sampler of S steps; each is warmed up by one sample(x_T)
    before the counted one, so that set-up done once (model preparation) is not counted.
    sample_kwargs go to sample() (model_kwargs, guidance_scale, ...).
    """
    counts = []
    for s in steps:
        sampler = sampler_for_steps(s)
        sampler.sample(x_T, **sample_kwargs)
        with OpCounter() as c:
            sampler.sample(x_T, **sample_kwargs)
        counts.append(c)
    a, b = counts
    span = steps[1] - steps[0]

    def per(ca, cb):
        return {k: (cb[k] - ca[k]) / span for k in set(ca) | set(cb) if cb[k] != ca[k]}

    return per(a.ops, b.ops), per(a.not_channels_last, b.not_channels_last)


# --- the census: bytes and FLOPs per op ------------------------------------------------------

# Ops that allocate or change metadata in place: counted, but they move no bytes.
NO_DATA_OPS = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::empty_permuted", "aten::new_empty",
    "aten::new_empty_strided", "aten::detach_", "aten::set_", "aten::resize_", "aten::as_strided_",
})
# In-place ops that write their `self` without reading it.
OVERWRITES = frozenset({
    "aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_", "aten::bernoulli_",
    "aten::random_", "aten::exponential_", "aten::cauchy_", "aten::log_normal_", "aten::geometric_",
})


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """flop_counter's attention count (QK^T and PV, 2 FLOPs a multiply-add), for 3-d or 4-d operands."""
    def four_d(shape):
        return (1,) * (4 - len(shape)) + tuple(shape)

    return sdpa_flop_count(four_d(query_shape), four_d(key_shape), four_d(value_shape))


# flop_counter's registry (mm, addmm, bmm, baddbmm, convolution, the GPU attention kernels),
# plus attention as the CPU dispatches it: SDPA itself, and the CPU flash kernel it becomes.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten.scaled_dot_product_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
}
FLOP_FORMULAS = {**flop_registry, **{op: shape_wrapper(f) for op, f in EXTRA_FLOP_FORMULAS.items()}}


def addressed_bytes(t: torch.Tensor) -> int:
    """The bytes a kernel addresses reading or writing t whole: numel * element_size, with a
    broadcast (stride 0) dimension counted once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        elements *= size if stride != 0 else min(size, 1)
    return elements * t.element_size()


def _storage_id(t: torch.Tensor) -> int:
    # the storage object's address: FakeTensors refuse data_ptr()
    return t.untyped_storage()._cdata


def _tensor_key(t: torch.Tensor) -> tuple:
    """Which memory t addresses: two arguments with one key are one read."""
    return (_storage_id(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensors(value) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _bound_arguments(func, args, kwargs) -> list:
    """[(schema argument, value)] of one call: positional arguments in order, then keywords."""
    schema_arguments = func._schema.arguments
    by_name = {a.name: a for a in schema_arguments}
    pairs = list(zip(schema_arguments, args))
    pairs += [(by_name[k], v) for k, v in kwargs.items() if k in by_name]
    return pairs


def call_bytes(func, args, kwargs, out) -> tuple:
    """(bytes read, bytes written) of one call, each distinct tensor once (addressed_bytes).

    Read: every tensor argument, except those written without being read (an out= argument,
    a native op's `out` / `*_out`, the `self` of copy_ or fill_). Written: the arguments the
    schema marks as mutated, and the outputs that are none of them. An op whose outputs
    alias its inputs and that writes nothing (aten::to, contiguous with nothing to do) moves
    nothing.
    """
    name = func._schema.name
    if name in NO_DATA_OPS:
        return 0, 0
    read, written = {}, {}
    for argument, value in _bound_arguments(func, args, kwargs):
        is_written = argument.alias_info is not None and argument.alias_info.is_write
        write_only = is_written and (argument.is_out or argument.name == "out" or argument.name.endswith("_out") or name in OVERWRITES)
        for t in _tensors(value):
            if is_written:
                written[_tensor_key(t)] = addressed_bytes(t)
            if not write_only:
                read[_tensor_key(t)] = addressed_bytes(t)
    outputs = _tensors(out)
    input_storages = {key[0] for key in read}
    if not written and outputs and all(_storage_id(t) in input_storages for t in outputs):
        return 0, 0
    for t in outputs:
        written.setdefault(_tensor_key(t), addressed_bytes(t))
    return sum(read.values()), sum(written.values())


def _is_composite(func) -> bool:
    """Whether the op is a composition of others (aten::linear of addmm, conv2d of convolution)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def run_counting_flops(func, args, kwargs) -> tuple:
    """(the op's output, its FLOPs): FLOP_FORMULAS' count of the op, or for a composite op
    (aten::linear) the count of what it runs, by FlopCounterMode; 0 for any other op."""
    formula = FLOP_FORMULAS.get(func._overloadpacket)
    if formula is None and _is_composite(func):
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as inner:
            out = func(*args, **kwargs)
        return out, inner.get_total_flops()
    out = func(*args, **kwargs)
    return out, (formula(*args, **kwargs, out_val=out) if formula is not None else 0)


def _copied(args, kwargs, out) -> bool:
    """Whether an op whose schema lets it return a view of its input made new memory instead."""
    input_storages = {_storage_id(t) for t in _tensors((args, kwargs))}
    return any(_storage_id(t) not in input_storages for t in _tensors(out))


class OpCensus(TorchDispatchMode):
    """Per op: calls, and per call signature (bytes read, bytes written, FLOPs) how many calls
    had it (`calls`). Runs on real tensors or, entered inside a FakeTensorMode, on fake ones.

    The ops are OpCounter's, by the same names, and also the ops that OpCounter skips as views
    because their schema lets them return one (aten::to.dtype, aten::contiguous,
    aten::reshape) when they copied instead: a cast or a layout copy is a kernel."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.calls = collections.defaultdict(collections.Counter)  # op -> {(read, written, flops): calls}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in METADATA_QUERIES or func._schema.name == "aten::lift_fresh":  # lifts a constant: no kernel
            return func(*args, **kwargs)
        if func.is_view:
            out = func(*args, **kwargs)
            if not _copied(args, kwargs, out):
                return out
            flops = 0  # an op that may return a view (aten::to, contiguous, reshape) and copied instead
        else:
            out, flops = run_counting_flops(func, args, kwargs)
        bytes_read, bytes_written = call_bytes(func, args, kwargs, out)
        name = func.name()
        self.ops[name] += 1
        self.calls[name][(bytes_read, bytes_written, flops)] += 1
        return out

    def totals(self) -> dict:
        """{op: {count, bytes_read, bytes_written, flops, calls}} of everything seen."""
        return {name: _row(self.ops[name], [(n, *signature) for signature, n in signatures.items()]) for name, signatures in self.calls.items()}


def _row(count, calls: list) -> dict:
    """One op's census from its calls [(calls, bytes read, bytes written, flops)] per signature."""
    return dict(
        count=count,
        bytes_read=sum(n * r for n, r, _, _ in calls),
        bytes_written=sum(n * w for n, _, w, _ in calls),
        flops=sum(n * f for n, _, _, f in calls),
        calls=sorted(calls, key=lambda c: c[1:]),
    )


def _per_step_calls(before: collections.Counter, after: collections.Counter, span: int) -> list:
    """[(calls per step, bytes read, bytes written, flops)] of the signatures whose counts differ."""
    calls = []
    for signature in set(before) | set(after):
        per_step = (after[signature] - before[signature]) / span
        if per_step != 0:
            calls.append((per_step, *signature))
    return calls


def _fake_mode_of(x_T):
    """The FakeTensorMode of a fake x_T (the mode its model was built under), else None."""
    return x_T.fake_mode if isinstance(x_T, FakeTensor) else None


def census_per_step(sampler_for_steps: Callable[[int], object], x_T: torch.Tensor, steps: Sequence[int] = (2, 5), **sample_kwargs) -> dict:
    """{op: {count, bytes_read, bytes_written, flops, calls}} per sampling step, differenced
    over two sample() calls of steps[0] and steps[1] steps as ops_per_step does: `count` is
    its count, and the census has the copies it misses besides (see OpCensus); calls:
    [(calls per step, bytes read, bytes written, flops)] per call signature, for the roofline
    model (apps/census/roofline.py). A per-sample op whose size grows with S (a table of S rows)
    leaves its difference: a count of 0 with bytes, the table's cost per step.

    A fake x_T (torch._subclasses.fake_tensor.FakeTensor) runs everything under its
    FakeTensorMode, sampler_for_steps included: build the model under that mode, with
    allow_non_fake_inputs=True for the schedule's real tensors.
    """
    fake_mode = _fake_mode_of(x_T)
    tables = []
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for s in steps:
            sampler = sampler_for_steps(s)
            sampler.sample(x_T, **sample_kwargs)
            with OpCensus() as census:
                sampler.sample(x_T, **sample_kwargs)
            tables.append(census)
    a, b = tables
    span = steps[1] - steps[0]
    per_step = {}
    for name in set(a.ops) | set(b.ops):
        calls = _per_step_calls(a.calls[name], b.calls[name], span)
        if calls:
            per_step[name] = _row((b.ops[name] - a.ops[name]) / span, calls)
    return per_step


# --- the command: python -m ddim_fast.apps.census.opcount ---------------------------------------------


def census_totals(census: dict) -> dict:
    """{ops, bytes_read, bytes_written, flops} of a census, summed over its ops."""
    return {field: sum(row[field] for row in census.values()) for field in ("count", "bytes_read", "bytes_written", "flops")}


def _parser() -> argparse.ArgumentParser:
    from .models import MODELS
    from .roofline import GPUS, LAUNCH_US, NUMBERS

    parser = argparse.ArgumentParser(
        prog="python -m ddim_fast.apps.census.opcount",
        description="Ops, bytes and FLOPs of one sampling step of a full-size model, counted on fake tensors "
        "(nothing computed or allocated), and a roofline MODEL of the step's time on a GPU.",
    )
    parser.add_argument("--model", choices=MODELS, default="sd15", help="sd15: diffusers' UNet2DConditionModel at SD-1.5's config; the others ddim_fast UNets (default sd15)")
    parser.add_argument("--gpu", choices=sorted(GPUS), nargs="+", default=["h200"], help="the GPUs to model (default h200)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="bf16", help="the sampling dtype (default bf16)")
    parser.add_argument("--batch", type=int, default=1, help="samples per call (default 1; guided, the model runs on twice as many)")
    parser.add_argument("--guided", action=argparse.BooleanOptionalAction, default=None, help="classifier-free guidance (default: on for sd15, off for the others)")
    parser.add_argument("--sampler", choices=("fast", "reference"), default="fast", help="FastSampler, or ReferenceSampler: the plain eager loop over the model as it is, in the sampling dtype (default fast)")
    parser.add_argument("--lean", action=argparse.BooleanOptionalAction, default=True, help="FastSampler's lean=, the lean rewrite of the model (default on)")
    parser.add_argument("--lean-refused", action="store_true", help="sd15: a UNet the lean rewrite does not fit (as one with a custom attention processor or LoRA), which runs as TabledUNet2D")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (default 0: no noise drawn)")
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 5], metavar=("S1", "S2"), help="the two sample() lengths differenced (default 2 5)")
    parser.add_argument("--numbers", choices=NUMBERS, default="measured", help="the GPU's peak and bandwidth: measured where we have them, else the datasheet's (default measured)")
    parser.add_argument("--launch-us", type=float, default=LAUNCH_US, help=f"each kernel's fixed cost inside a CUDA graph, us (default {LAUNCH_US})")
    parser.add_argument("--top", type=int, default=15, help="ops listed per GPU, slowest first (default 15)")
    return parser


def main(argv=None) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ...sampling.fast import FastSampler
    from ...sampling.reference import ReferenceSampler
    from .models import fake_case
    from .roofline import format_roofline, roofline

    args = _parser().parse_args(argv)
    if args.batch < 1 or args.top < 0 or args.steps[0] == args.steps[1] or min(args.steps) < 1:
        raise SystemExit("opcount: --batch must be >= 1, --top >= 0, and --steps two different lengths >= 1")
    guided = args.model == "sd15" if args.guided is None else args.guided
    dtype = DTYPES[args.dtype]
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the schedule's tensors are real
    try:
        case = fake_case(args.model, mode=mode, dtype=dtype, batch=args.batch, guided=guided, lean_refused=args.lean_refused)
    except ValueError as e:
        raise SystemExit(f"opcount: {e}") from None

    def sampler_for_steps(steps):
        if args.sampler == "reference":  # the model in the sampling dtype, the update in x_T's fp32
            return ReferenceSampler(case.model, case.schedule, steps=steps, eta=args.eta)
        return FastSampler(case.model, case.schedule, steps=steps, eta=args.eta, dtype=dtype, lean=args.lean)

    census = census_per_step(sampler_for_steps, case.x_T, steps=args.steps, **case.sample_kwargs)
    totals = census_totals(census)
    what = "ReferenceSampler" if args.sampler == "reference" else f"FastSampler (lean={args.lean})"
    print(f"census of one {what} step ({args.dtype}, eta {args.eta:g}), on fake tensors: {case.description}")
    print("  ops as the CPU dispatches them: a GPU runs the same model code, and may add kernels no census sees (cuDNN's layout transposes)")
    print(f"  {totals['count']:.0f} ops per step, {totals['bytes_read'] / 1e9:.3f} GB read, {totals['bytes_written'] / 1e9:.3f} GB written, {totals['flops'] / 1e9:.1f} GFLOP")
    for gpu in args.gpu:
        estimate = roofline(census, gpu, dtype, numbers=args.numbers, launch_us=args.launch_us)
        print()
        print(format_roofline(estimate, top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["OpCounter", "ops_per_step", "COPIES", "METADATA_QUERIES", "OpCensus", "census_per_step", "call_bytes", "addressed_bytes", "run_counting_flops", "census_totals", "main"]
