"""Each fused op against the eager PyTorch chain it replaces, at the shapes samplers use.

    pytest benchmarks/test_kernels.py --benchmark-only

extra_info["gbps"] is the bytes the op must move (read + write) over its median time;
the `copy` benchmark of each group gives the machine's copy bandwidth to compare with
(benchmarks/report.py prints each as a fraction of it).
"""

import pytest
import torch
import torch.nn.functional as F

from ddim_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (B, C, H, W): a CIFAR-10 batch and a large image batch
STEP_SHAPES = [(64, 3, 32, 32), (4, 3, 256, 256)]
# GroupNorm sites of the CIFAR-10 UNet: (C, H) per level, at the benchmark batch sizes
GN_SHAPES = [(16, 128, 32), (16, 256, 16), (1, 256, 16), (64, 256, 8)] if not CUDA else [(64, 128, 32), (64, 256, 16), (1, 128, 32), (1, 256, 16)]
# (dtype, layout): on a GPU the fp16 NCHW case of GPU-NOTES.md and the lean model's channels_last
GN_CASES = [(torch.float32, "nchw")] if not CUDA else [(torch.float16, "nchw"), (torch.bfloat16, "cl"), (torch.float32, "cl")]
GN_IMPLS = ["aten", "fused", "copy"] + (["triton"] if CUDA else [])

A_T, A_S, SIGMA = 0.4, 0.7, 0.3


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed(benchmark, fn, nbytes, group, name):
    benchmark.group = group
    benchmark.extra_info.update(device=DEVICE, impl=name, bytes=nbytes)

    def run():
        fn()
        _sync()

    benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


def _eager_step(x, e, z):
    """The official generalized_steps arithmetic: x0, then the update, as separate ops."""
    at, an = torch.tensor(A_T), torch.tensor(A_S)
    x0 = (x - e * (1 - at).sqrt()) / at.sqrt()
    c1 = SIGMA
    c2 = ((1 - an) - c1**2).sqrt()
    return an.sqrt() * x0 + c1 * z + c2 * e


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "fused", "copy"])
def test_ddim_step(benchmark, shape, impl):
    g = torch.Generator().manual_seed(0)
    x, e, z = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(3))
    out = torch.empty_like(x)
    n = x.numel() * 4
    if impl == "eager":
        fn = lambda: _eager_step(x, e, z)  # noqa: E731
    elif impl == "fused":
        fn = lambda: ops.ddim_step(x, e, A_T, A_S, SIGMA, noise=z, out=out)  # noqa: E731
    else:
        fn = lambda: out.copy_(x)  # noqa: E731
    _timed(benchmark, fn, 2 * n if impl == "copy" else 4 * n, f"ddim_step-{'x'.join(map(str, shape))}", impl)


def _eager_x0(x, e):
    """The official x̂₀ prediction and clamp (clip_denoised): three ops and a clamp."""
    at = torch.tensor(A_T)
    return ((x - e * (1 - at).sqrt()) / at.sqrt()).clamp(-1.0, 1.0)


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "fused", "copy"])
def test_predict_x0(benchmark, shape, impl):
    """x̂₀ plus clamp reads x and eps and writes x̂₀ (3 passes)."""
    g = torch.Generator().manual_seed(0)
    x, e = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(2))
    out = torch.empty_like(x)
    n = x.numel() * 4
    if impl == "eager":
        fn = lambda: _eager_x0(x, e)  # noqa: E731
    elif impl == "fused":
        fn = lambda: ops.predict_x0(x, e, A_T, clip=1.0, out=out)  # noqa: E731
    else:
        fn = lambda: out.copy_(x)  # noqa: E731
    _timed(benchmark, fn, 2 * n if impl == "copy" else 3 * n, f"predict_x0-{'x'.join(map(str, shape))}", impl)


@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: f"b{s[0]}-c{s[1]}-{s[2]}x{s[2]}")
@pytest.mark.parametrize("dtype, layout", GN_CASES, ids=[f"{str(d).split('.')[-1]}-{lay}" for d, lay in GN_CASES])
@pytest.mark.parametrize("impl", GN_IMPLS)
def test_group_norm_silu(benchmark, shape, dtype, layout, impl):
    """GroupNorm+SiLU must read x and write y (2 passes); aten's GroupNorm then SiLU take 5.
    On a GPU "fused" is the CUDA kernel and "triton" the Triton one."""
    b, c, h = shape
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(b, c, h, h, generator=g).to(DEVICE, dtype).contiguous(memory_format=fmt)
    w, bias = torch.randn(c, generator=g).to(DEVICE, dtype), torch.randn(c, generator=g).to(DEVICE, dtype)
    y = torch.empty_like(x)
    n = x.numel() * x.element_size()
    if impl == "aten":
        fn = lambda: F.silu(F.group_norm(x, 32, w, bias, 1e-6))  # noqa: E731
    elif impl in ("fused", "triton"):
        backend = "triton" if impl == "triton" else None
        fn = lambda: ops.group_norm_silu(x, 32, w, bias, 1e-6, backend=backend)  # noqa: E731
    else:
        fn = lambda: y.copy_(x)  # noqa: E731
    suffix = "" if layout == "nchw" else "-cl"
    _timed(benchmark, fn, 2 * n, f"group_norm_silu-b{b}-c{c}-{h}x{h}-{str(dtype).split('.')[-1]}{suffix}", impl)


@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: f"b{s[0]}-c{s[1]}-{s[2]}x{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if not CUDA else [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("impl", ["aten", "fused", "copy"])
def test_add_group_norm_silu(benchmark, shape, dtype, impl):
    """A block's closing residual add and the next norm, channels_last (the lean model's
    site): aten's add + group_norm + silu against one add_group_norm_act. It must move
    x, r in and s, y out (4 passes); aten moves 7 (add 3, group_norm 3 or more, silu 2)."""
    b, c, h = shape
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x, r = (torch.randn(b, c, h, h, generator=g).to(DEVICE, dtype).contiguous(memory_format=cl) for _ in range(2))
    w, bias = torch.randn(c, generator=g).to(DEVICE), torch.randn(c, generator=g).to(DEVICE)  # fp32, as the lean model keeps them
    y = torch.empty_like(x)
    n = x.numel() * x.element_size()
    if impl == "aten":
        fn = lambda: F.silu(F.group_norm(x + r, 32, w.to(dtype), bias.to(dtype), 1e-6))  # noqa: E731
    elif impl == "fused":
        fn = lambda: ops.group_norm_act(x, 32, w, bias, 1e-6, residual=r)  # noqa: E731
    else:
        fn = lambda: y.copy_(x)  # noqa: E731
    _timed(benchmark, fn, 2 * n if impl == "copy" else 4 * n, f"add_group_norm_silu-b{b}-c{c}-{h}x{h}-{str(dtype).split('.')[-1]}-cl", impl)


# Transformer-layer sites of SD-1.5's UNet (guided: batch 2): (tokens, width) at its first
# level (64x64 latents, 320 channels) and its third (16x16, 1280); on a CPU the first level
# of 32x32 latents
LN_SHAPES = [(2 * 4096, 320), (2 * 256, 1280)] if CUDA else [(2 * 1024, 320), (2 * 256, 1280)]
TRANSFORMER_IMPLS = ["aten", "fused", "copy"] + (["triton"] if CUDA else [])
TRANSFORMER_DTYPES = [torch.float32, torch.bfloat16] if not CUDA else [torch.bfloat16]


@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", TRANSFORMER_DTYPES, ids=str)
@pytest.mark.parametrize("impl", TRANSFORMER_IMPLS)
def test_add_layer_norm(benchmark, shape, dtype, impl):
    """A transformer layer's residual add and the LayerNorm after it: aten's add + layer_norm
    against one add_layer_norm. It must move x, r in and s, y out (4 passes); aten moves 5."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    w, bias = torch.randn(shape[1], generator=g).to(DEVICE, dtype), torch.randn(shape[1], generator=g).to(DEVICE, dtype)
    y = torch.empty_like(x)
    n = x.numel() * x.element_size()
    if impl == "aten":
        fn = lambda: F.layer_norm(x + r, (shape[1],), w, bias, 1e-5)  # noqa: E731
    elif impl in ("fused", "triton"):
        backend = "triton" if impl == "triton" else None
        fn = lambda: ops.add_layer_norm(x, r, w, bias, 1e-5, backend=backend)  # noqa: E731
    else:
        fn = lambda: y.copy_(x)  # noqa: E731
    _timed(benchmark, fn, 2 * n if impl == "copy" else 4 * n, f"add_layer_norm-{shape[0]}x{shape[1]}-{str(dtype).split('.')[-1]}", impl)


@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", TRANSFORMER_DTYPES, ids=str)
@pytest.mark.parametrize("impl", TRANSFORMER_IMPLS)
def test_geglu(benchmark, shape, dtype, impl):
    """GEGLU after its projection (4x the width: SD's feed-forward): aten's chunk, GELU and
    product against one geglu. It must read h (2F) and write out (F): 3F per row; aten moves
    6F (GELU F + F, product 2F + F)."""
    tokens, width = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 8 * width, generator=g).to(DEVICE, dtype)
    out = torch.empty(tokens, 4 * width, device=DEVICE, dtype=dtype)
    n = out.numel() * out.element_size()
    if impl == "aten":

        def fn():
            a, gate = h.chunk(2, dim=-1)
            return a * F.gelu(gate)

    elif impl in ("fused", "triton"):
        backend = "triton" if impl == "triton" else None
        fn = lambda: ops.geglu(h, backend=backend)  # noqa: E731
    else:
        fn = lambda: out.copy_(h[:, : 4 * width])  # noqa: E731
    _timed(benchmark, fn, 2 * n if impl == "copy" else 3 * n, f"geglu-{tokens}x{4 * width}-{str(dtype).split('.')[-1]}", impl)
