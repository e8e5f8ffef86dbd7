"""The fused ops on every backend this machine has, against float64 references.

Outputs are poisoned (NaN) before a kernel writes them, so an element left unwritten
fails. Triton kernels run through its interpreter (TRITON_INTERPRET=1, conftest.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ddim_fast import ops
from ddim_fast.ops.extension import has_native_kernel

from .conftest import requires_cuda, requires_triton, requires_triton_interpreter

native_cpu = pytest.mark.skipif(not has_native_kernel("ddim_step", "cpu"), reason="the extension's CPU kernels are not built")

# (backend, device) pairs: the native CPU op, Triton under its interpreter, plain PyTorch
BACKENDS = [
    pytest.param("cpu", "cpu", marks=native_cpu),
    pytest.param("triton", "cpu", marks=requires_triton_interpreter),
    pytest.param("torch", "cpu"),
    pytest.param("cuda", "cuda", marks=requires_cuda),
    pytest.param("triton", "cuda", marks=requires_cuda),
]

# (dtype, atol, rtol) for outputs of magnitude ~1-10, fp32 arithmetic inside
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-2, 5e-3), (torch.bfloat16, 8e-2, 2e-2)]

SHAPES = [
    (3, 5, 7, 9),  # odd everything
    (1, 3, 32, 32),  # a CIFAR image
    (2, 1, 1, 1),  # one element per sample
    (1037,),  # flat, not a multiple of any block size
]


def _poison(t):
    return t.fill_(float("nan"))


def _ref_x0_eps(x, m, a_t, prediction):
    sa, s1m = math.sqrt(a_t), math.sqrt(1 - a_t)
    if prediction == "eps":
        return (x - s1m * m) / sa, m
    if prediction == "x0":
        return m, (x - sa * m) / s1m
    return sa * x - s1m * m, sa * m + s1m * x


def ref_ddim_step(x, m, a_t, a_s, sigma, noise, clip, prediction, clipped_eps, ddpm_mean):
    """Eq. 12 of the DDIM paper (or the DDPM posterior mean) in float64, written plainly."""
    x, m = x.double(), m.double()
    x0, eps = _ref_x0_eps(x, m, a_t, prediction)
    if clip is not None:
        x0 = x0.clamp(*clip)
        if clipped_eps:
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    if ddpm_mean:
        beta = 1 - a_t / a_s
        out = (math.sqrt(a_s) * beta * x0 + math.sqrt(1 - beta) * (1 - a_s) * x) / (1 - a_t)
    else:
        out = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma**2) * eps
    if sigma > 0:
        out = out + sigma * noise.double()
    return out, x0


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    m = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    z = torch.randn(shape, generator=g).to(device=device)  # fp32 noise, as the samplers draw it
    return x, m, z


def _close(got, ref, dtype, atol, rtol, torch_err=None):
    err = (got.double() - ref).abs()
    ok = err <= atol + rtol * ref.abs()
    if torch_err is not None:  # low precision: within twice PyTorch's own error at that dtype
        ok = ok | (err <= 2 * torch_err + 1e-12)
    assert not torch.isnan(got).any(), "unwritten (poisoned) output elements"
    assert ok.all(), f"max err {err.max().item():.3g} ({dtype})"


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sigma_frac, clip, clipped_eps", [(0.0, None, False), (0.6, None, False), (0.0, 1.0, False), (0.6, (-0.5, 2.0), True)])
def test_ddim_step(backend, device, dtype, atol, rtol, shape, prediction, sigma_frac, clip, clipped_eps):
    a_t, a_s = 0.37, 0.81
    sigma = sigma_frac * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    x, m, z = _inputs(shape, dtype, device)
    out, x0_out = _poison(torch.empty_like(x)), _poison(torch.empty_like(x))
    ret = ops.ddim_step(x, m, a_t, a_s, sigma, noise=z if sigma else None, clip=clip, out=out, prediction=prediction, use_clipped_model_output=clipped_eps, x0_out=x0_out, backend=backend)
    assert ret is out
    ref, ref_x0 = ref_ddim_step(x, m, a_t, a_s, sigma, z, (-clip, clip) if isinstance(clip, float) else clip, prediction, clipped_eps, False)
    scale = max(1.0, ref.abs().max().item())
    _close(out, ref, dtype, atol * scale, rtol)
    _close(x0_out, ref_x0, dtype, atol * scale, rtol)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_ddim_step_ddpm_mean_and_in_place(backend, device, dtype, atol, rtol):
    a_t, a_s = 0.2, 0.5
    sigma = math.sqrt(1 - a_t / a_s)
    x, m, z = _inputs((2, 3, 5, 5), dtype, device, seed=3)
    ref, _ = ref_ddim_step(x, m, a_t, a_s, sigma, z, (-1.0, 1.0), "eps", False, True)
    xc = x.clone()
    ret = ops.ddim_step(xc, m, a_t, a_s, sigma, noise=z, clip=True, out=xc, ddpm_mean=True, backend=backend)  # out aliases x
    assert ret is xc
    _close(xc, ref, dtype, atol * 4, rtol)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_ddim_step_layouts(backend, device):
    """channels_last in and out, and mixed layouts (computed on dense copies)."""
    a_t, a_s, sigma = 0.5, 0.9, 0.1
    x, m, z = _inputs((2, 4, 5, 3), torch.float32, device, seed=4)
    ref, _ = ref_ddim_step(x, m, a_t, a_s, sigma, z, None, "eps", False, False)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    out = _poison(cl(torch.empty_like(x)))
    ops.ddim_step(cl(x), cl(m), a_t, a_s, sigma, noise=cl(z), out=out, backend=backend)
    _close(out, ref, torch.float32, 1e-5, 1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = _poison(torch.empty(5, 3, 2, 4, device=device).permute(2, 3, 0, 1))  # a strided view
    ops.ddim_step(cl(x), m[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3), a_t, a_s, sigma, noise=z, out=out, backend=backend)
    _close(out, ref, torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("with_eps_out", [True, False])
def test_predict_x0(backend, device, dtype, atol, rtol, prediction, clip, with_eps_out):
    """x̂₀ (clamped or not), and eps when asked for: the CPU kernel has a loop for each."""
    a_t = 0.3
    x, m, _ = _inputs((3, 5, 7, 9), dtype, device, seed=1)
    out = _poison(torch.empty_like(x))
    eps_out = _poison(torch.empty_like(x)) if with_eps_out else None
    ops.predict_x0(x, m, a_t, clip=clip, out=out, prediction=prediction, eps_out=eps_out, backend=backend)
    x0, eps = _ref_x0_eps(x.double(), m.double(), a_t, prediction)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (x.double() - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    scale = max(1.0, x0.abs().max().item())
    _close(out, x0, dtype, atol * scale, rtol)
    if with_eps_out:
        _close(eps_out, eps, dtype, atol * max(1.0, eps.abs().max().item()), rtol)


def _ref_gn_silu(x, G, w, b, eps, add_bias, silu=True):
    h = x.double()
    if add_bias is not None:
        h = h + add_bias.double().reshape(*add_bias.shape, 1, 1)  # (N, C) or (C,)
    y = F.group_norm(h, G, None if w is None else w.double(), None if b is None else b.double(), eps)
    return F.silu(y) if silu else y


GN_SHAPES = [
    (2, 96, 5, 7, 32),  # groups of 3 channels, odd spatial size
    (1, 64, 16, 16, 32),  # groups of 2, a UNet shape
    (3, 12, 1, 1, 4),  # one pixel
    (1, 32, 33, 35, 1),  # one group of everything, more than one tile
    (2, 6, 9, 9, 6),  # one channel per group
    (3, 8, 7, 9, 1),  # one group, several samples: consecutive tasks share channel indices
    (2, 4, 40, 30, 2),  # rows longer than the CPU kernel's 1024-value accumulation chunk
]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W, G", GN_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine, add", [(True, False), (True, True), (False, False)])
def test_group_norm_silu(backend, device, dtype, atol, rtol, N, C, H, W, G, channels_last, affine, add):
    g = torch.Generator().manual_seed(N * C + H)
    x = (torch.randn(N, C, H, W, generator=g) * 3 + 5).to(device=device, dtype=dtype)  # a mean far from 0
    w = torch.randn(C, generator=g).to(device=device, dtype=dtype) if affine else None
    b = torch.randn(C, generator=g).to(device=device, dtype=dtype) if affine else None
    ab = torch.randn(N, C, generator=g).to(device=device, dtype=dtype) if add else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = ops.group_norm_silu(x, G, w, b, 1e-6, add_bias=ab, backend=backend)
    ref = _ref_gn_silu(x, G, w, b, 1e-6, ab)
    torch_err = None
    if dtype != torch.float32:  # PyTorch's own error at this precision
        h = x + ab[:, :, None, None] if add else x
        torch_err = (F.silu(F.group_norm(h.float(), G, None if w is None else w.float(), None if b is None else b.float(), 1e-6)).to(dtype).double() - ref).abs().max().item()
    assert y.shape == x.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _close(y, ref, dtype, atol * 10, rtol, torch_err)


# (silu, residual, add_bias): the ResNet block's norm1 after an add (silu, residual),
# the attention norm after an add (no silu), norm2 with one time-embedding row shared
# by the batch (C,) or one per sample (N, C)
GN_ACT_CASES = [(True, True, None), (False, True, None), (True, False, "row"), (True, True, "row"), (False, False, "per_sample"), (False, True, "per_sample")]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W, G", GN_SHAPES[:4] + GN_SHAPES[5:])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu, residual, add", GN_ACT_CASES)
def test_group_norm_act(backend, device, dtype, atol, rtol, N, C, H, W, G, channels_last, silu, residual, add):
    g = torch.Generator().manual_seed(N * C + H + 7)
    x = (torch.randn(N, C, H, W, generator=g) * 3 + 5).to(device=device, dtype=dtype)
    r = (torch.randn(N, C, H, W, generator=g) * 2 - 1).to(device=device, dtype=dtype) if residual else None
    w, b = torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device)  # fp32, as the lean model keeps them
    ab = {None: None, "row": torch.randn(C, generator=g), "per_sample": torch.randn(N, C, generator=g)}[add]
    ab = None if ab is None else ab.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    out = ops.group_norm_act(x, G, w, b, 1e-6, silu=silu, add_bias=ab, residual=r, backend=backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if residual:
        s, y = out
        s_ref = x.double() + r.double()
        # the sum is rounded to x's dtype once, as torch's own add rounds it
        torch_s = (x + r).double()
        _close(s, s_ref, dtype, atol, rtol, (torch_s - s_ref).abs().max().item() if dtype != torch.float32 else None)
        assert s.dtype == dtype and s.is_contiguous(memory_format=fmt)
        h = x + r  # what a separate add feeds the norm
    else:
        y, h, s_ref = out, x, x.double()
    ref = _ref_gn_silu(s_ref, G, w, b, 1e-6, ab, silu)
    torch_err = None
    if dtype != torch.float32:  # PyTorch's own error at this precision, from the same rounded input
        hh = h.float() + (0 if ab is None else ab.reshape(*ab.shape, 1, 1))
        yt = F.group_norm(hh, G, w, b, 1e-6)
        torch_err = ((F.silu(yt) if silu else yt).to(dtype).double() - ref).abs().max().item()
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    _close(y, ref, dtype, atol * 10, rtol, torch_err)


def _triton_gn_plan(kind, **kw):
    from ddim_fast.kernels.group_norm_silu import Plan

    return Plan(kind, **kw)


# every launch plan of the Triton kernels, forced on shapes small enough for the interpreter
TRITON_GN_PLANS = [
    ((2, 16, 5, 7, 4), dict(kind="one_pass", gpb=2, block_p=64, block_d=4)),  # two groups per program
    ((1, 48, 3, 3, 4), dict(kind="one_pass", gpb=4, block_p=16, block_d=16)),  # 12 channels per group, padded to 16
    ((2, 8, 9, 11, 2), dict(kind="split", split=4, chunk=32, block_p=16, block_d=4)),  # 99 pixels: the last chunk holds 3
    ((1, 6, 7, 7, 3), dict(kind="split", split=7, chunk=7, block_p=4, block_d=2)),  # chunks not a multiple of the tile
    ((3, 4, 5, 5, 1), dict(kind="split", split=1, chunk=25, block_p=8, block_d=4)),  # one chunk: the two-kernel path alone
]


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=requires_triton_interpreter), pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape, launch", TRITON_GN_PLANS, ids=[f"{p['kind']}-{'x'.join(map(str, s))}" for s, p in TRITON_GN_PLANS])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu, residual, add", GN_ACT_CASES[:4])
def test_triton_group_norm_every_plan(device, dtype, atol, rtol, shape, launch, channels_last, silu, residual, add):
    from ddim_fast.kernels import group_norm_silu as tk

    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(N * C + H + 11)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(N, C, H, W, generator=g) * 3 + 5).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    r = (torch.randn(N, C, H, W, generator=g) * 2 - 1).to(device=device, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    w, b = torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device)
    ab = torch.randn(C, generator=g).to(device) if add else None
    real_empty = torch.empty_like
    try:  # poison every output the kernels allocate
        torch.empty_like = lambda *a, **k: _poison(real_empty(*a, **k))
        out = tk.group_norm_act(x, G, w, b, 1e-6, add_bias=ab, residual=r, silu=silu, launch_plan=_triton_gn_plan(**launch))
    finally:
        torch.empty_like = real_empty
    s, y = out if residual else (x, out)
    if residual:
        _close(s, x.double() + r.double(), dtype, atol, rtol, ((x + r).double() - (x.double() + r.double())).abs().max().item() if dtype != torch.float32 else None)
    ref = _ref_gn_silu(s.double(), G, w, b, 1e-6, ab, silu)
    torch_err = None
    if dtype != torch.float32:
        yt = F.group_norm(s.float() + (0 if ab is None else ab.reshape(C, 1, 1)), G, w, b, 1e-6)
        torch_err = ((F.silu(yt) if silu else yt).to(dtype).double() - ref).abs().max().item()
    assert y.is_contiguous(memory_format=fmt)
    _close(y, ref, dtype, atol * 10, rtol, torch_err)


@requires_triton
def test_triton_group_norm_plan_choice():
    """One pass while a group fits a program, several groups per program in channels_last
    when there are programs to spare, and a split that fills the GPU for larger groups."""
    import triton
    from ddim_fast.kernels.group_norm_silu import ONE_PASS_MAX, plan

    sms2 = 264  # programs that fill an H100
    assert plan(1, 128, 32 * 32, 32, 2, True, sms2) == _triton_gn_plan("one_pass", gpb=1, block_p=1024, block_d=4)  # batch 1: every group its own program
    assert plan(64, 128, 32 * 32, 32, 2, True, sms2).gpb == 4  # rows of 4 groups (32 bytes in bf16): as wide as 264 programs allow
    assert plan(64, 128, 32 * 32, 32, 2, False, sms2).gpb == 1  # NCHW groups are contiguous already
    assert plan(64, 384, 32 * 32, 32, 2, True, sms2).kind == "one_pass"  # 12 channels x 1024 pixels fit
    big = plan(1, 128, 256 * 256, 32, 2, True, sms2)
    assert big.kind == "split" and big.split * 32 >= sms2 // 2 and (big.split - 1) * big.chunk < 256 * 256 <= big.split * big.chunk
    assert plan(64, 128, 256 * 256, 32, 2, True, sms2).split == 1  # enough groups to fill the GPU
    for n, c, hw, grp in [(1, 32, 33 * 35, 1), (2, 4, 1200, 2), (7, 60, 49, 3)]:
        p = plan(n, c, hw, grp, 4, True, sms2)
        assert (p.kind == "one_pass") == (triton.next_power_of_2(hw) * triton.next_power_of_2(c // grp) <= ONE_PASS_MAX)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_group_norm_act_residual_layout_follows_x(backend, device):
    """A residual in the other layout is taken as it is; s and y keep x's layout."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 6, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 5, 6, generator=g).to(device)  # NCHW
    s, y = ops.group_norm_act(x, 4, residual=r, backend=backend)
    assert s.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous(memory_format=torch.channels_last)
    _close(s, x.double() + r.double(), torch.float32, 1e-6, 1e-6)
    _close(y, _ref_gn_silu(x.double() + r.double(), 4, None, None, 1e-6, None), torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_act_at_an_odd_storage_offset(backend, device, dtype):
    """Tensors that start one element into their storage: no vector access may assume
    more alignment than the pointers have."""
    N, C, H, W, G = 2, 16, 8, 8, 4
    g = torch.Generator().manual_seed(2)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=dtype, device=device)
        out = buf[1:].view(t.shape)
        return out.copy_(t)

    x = shifted(torch.randn(N, C, H, W, generator=g) * 2 + 1)
    r = shifted(torch.randn(N, C, H, W, generator=g))
    w, b = torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device)
    s, y = ops.group_norm_act(x, G, w, b, 1e-6, residual=r, backend=backend)
    low = dtype != torch.float32
    _close(s, x.double() + r.double(), dtype, 1e-6, 2**-7 if low else 1e-6)  # one bf16 ulp (Triton's interpreter truncates)
    _close(y, _ref_gn_silu(s.double(), G, w, b, 1e-6, None), dtype, 0.1 if low else 1e-4, 3e-2 if low else 1e-4)


def test_group_norm_act_bad_input():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"add_group_norm_act: residual must have x's shape \(2, 8, 4, 4\), got \(2, 8, 4\)"):
        ops.group_norm_act(x, 4, residual=torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match="add_group_norm_act: residual must have x's dtype torch.float32, got torch.bfloat16"):
        ops.group_norm_act(x, 4, residual=x.bfloat16())
    with pytest.raises(ValueError, match=r"group_norm_act: add_bias must have shape \(2, 8\) or \(8,\), got \(3, 8\)"):
        ops.group_norm_act(x, 4, add_bias=torch.randn(3, 8))
    with pytest.raises(TypeError, match="silu must be True or False"):
        ops.group_norm_act(x, 4, silu=1)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_inputs(backend, device):
    x = torch.empty(0, 4, 3, 3, device=device)
    assert ops.ddim_step(x, x.clone(), 0.5, 0.9, 0.0, backend=backend).shape == x.shape
    assert ops.predict_x0(x, x.clone(), 0.5, backend=backend).shape == x.shape
    assert ops.group_norm_silu(x, 2, backend=backend).shape == x.shape
    s, y = ops.group_norm_act(x, 2, residual=x.clone(), silu=False, backend=backend)
    assert s.shape == y.shape == x.shape


def test_default_backend_on_cpu():
    x, m, _ = _inputs((2, 3, 4, 4), torch.float32, "cpu")
    a = ops.ddim_step(x, m, 0.5, 0.9, 0.0)
    b = ops.ddim_step(x, m, 0.5, 0.9, 0.0, backend="torch")
    torch.testing.assert_close(a, b)
    # float64 goes to PyTorch, in float64
    a64 = ops.ddim_step(x.double(), m.double(), 0.5, 0.9, 0.0)
    assert a64.dtype == torch.float64
    ref, _ = ref_ddim_step(x, m, 0.5, 0.9, 0.0, None, None, "eps", False, False)
    assert (a64 - ref).abs().max().item() < 1e-12


def test_noise_is_drawn_when_not_given():
    x, m, _ = _inputs((2, 3, 4, 4), torch.float32, "cpu")
    g = torch.Generator().manual_seed(7)
    a = ops.ddim_step(x, m, 0.5, 0.9, 0.2, generator=g)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    b = ops.ddim_step(x, m, 0.5, 0.9, 0.2, noise=z)
    torch.testing.assert_close(a, b)


@native_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 16, 8, 8)])  # with and without a scalar tail
def test_cpu_low_precision_is_the_fp32_result_rounded(dtype, shape):
    """fp16/bf16 storage, fp32 arithmetic: each output is the fp32 kernel's result on the
    upcast inputs, rounded to nearest even (a truncating store would differ in about half
    of the elements, well inside the float64 tests' tolerance)."""
    x, m, z = _inputs(shape, dtype, "cpu", seed=11)
    xf, mf = x.float(), m.float()
    a_t, a_s, sigma = 0.37, 0.81, 0.2
    args = dict(noise=z, clip=1.5, prediction="v", use_clipped_model_output=True, backend="cpu")
    out, x0_out = _poison(torch.empty_like(x)), _poison(torch.empty_like(x))
    ops.ddim_step(x, m, a_t, a_s, sigma, out=out, x0_out=x0_out, **args)
    ref_x0 = torch.empty_like(xf)
    ref = ops.ddim_step(xf, mf, a_t, a_s, sigma, x0_out=ref_x0, **args)
    assert torch.equal(out, ref.to(dtype)) and torch.equal(x0_out, ref_x0.to(dtype))

    out, eps_out = _poison(torch.empty_like(x)), _poison(torch.empty_like(x))
    ops.predict_x0(x, m, a_t, clip=1.0, out=out, eps_out=eps_out, backend="cpu")
    ref_eps = torch.empty_like(xf)
    ref = ops.predict_x0(xf, mf, a_t, clip=1.0, eps_out=ref_eps, backend="cpu")
    assert torch.equal(out, ref.to(dtype)) and torch.equal(eps_out, ref_eps.to(dtype))

    C = shape[1]
    g = torch.Generator().manual_seed(5)
    w, b, ab = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(shape[0], C, generator=g)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xc = (x * 3 + 2).contiguous(memory_format=fmt)
        y = ops.group_norm_silu(xc, 1, w.to(dtype), b.to(dtype), add_bias=ab.to(dtype), backend="cpu")
        ref = ops.group_norm_silu(xc.float(), 1, w.to(dtype).float(), b.to(dtype).float(), add_bias=ab.to(dtype).float(), backend="cpu")
        assert torch.equal(y, ref.to(dtype)), fmt
        # with a residual: the sum as torch's add rounds it, then the norm of that stored sum
        r = m.contiguous(memory_format=fmt)
        for silu in (True, False):
            s, y = ops.group_norm_act(xc, 1, w, b, add_bias=ab[0], residual=r, silu=silu, backend="cpu")
            assert torch.equal(s, xc + r), fmt
            ref = ops.group_norm_act(s.float(), 1, w, b, add_bias=ab[0], silu=silu, backend="cpu")
            assert torch.equal(y, ref.to(dtype)), (fmt, silu)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_over_the_whole_range_of_silu(backend, device, channels_last):
    """SiLU's input (the normalised value times weight plus bias) from -120 to 120, past
    where e^-v under- or overflows fp32 (|v| > 87): the CPU kernel's polynomial 2^t and its
    clamp of t, and each backend's SiLU, against float64 to 1e-5 relative."""
    g = torch.Generator().manual_seed(7)
    N, C, H, W, G = 2, 24, 7, 9, 4
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.linspace(-40.0, 40.0, C)  # |x̂| up to ~3: |w * x̂| up to ~120
    b = torch.linspace(-30.0, 30.0, C).flip(0)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = ops.group_norm_silu(x, G, w.to(device), b.to(device), 1e-6, backend=backend)
    ref = _ref_gn_silu(x, G, w.to(device), b.to(device), 1e-6, None)
    pre = _ref_gn_silu(x, G, w.to(device), b.to(device), 1e-6, None, silu=False)
    assert pre.min() < -90 and pre.max() > 90, "the inputs do not reach SiLU's tails"
    _close(y, ref, torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_group_norm_silu_mean_much_larger_than_spread(backend, device, channels_last, add):
    """Mean 1e3, spread 1 (and with add_bias: per-channel offsets of 1e3 that the norm
    removes): moments taken about 0 in fp32 would lose the variance to cancellation."""
    if backend == "torch" and channels_last:  # checked on torch 2.11 and 2.13
        pytest.xfail("aten's channels_last CPU GroupNorm itself loses the variance here (errors of 0.4-3)")
    g = torch.Generator().manual_seed(3)
    N, C, H, W, G = 2, 16, 9, 11, 4
    x = torch.randn(N, C, H, W, generator=g) + 1000.0
    ab = (torch.randn(N, C, generator=g) * 1000.0) if add else None
    if add:  # the norm sees x + ab: keep one group's channels at a common offset so its spread stays ~1
        ab = ab.view(N, G, C // G)[:, :, :1].expand(N, G, C // G).reshape(N, C).contiguous()
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ab = ab.to(device) if add else None
    y = ops.group_norm_silu(x, G, w.to(device), b.to(device), 1e-6, add_bias=ab, backend=backend)
    ref = _ref_gn_silu(x, G, w.to(device), b.to(device), 1e-6, ab)
    _close(y, ref, torch.float32, 2e-3, 1e-3)
    # the same moments with the large mean split between x and a residual
    r = torch.full_like(x, 400.0)
    s, y = ops.group_norm_act(x - 400.0, G, w.to(device), b.to(device), 1e-6, add_bias=ab, residual=r, backend=backend)
    _close(y, _ref_gn_silu(s.double(), G, w.to(device), b.to(device), 1e-6, ab), torch.float32, 2e-3, 1e-3)
