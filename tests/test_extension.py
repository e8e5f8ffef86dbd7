"""The native extension: operators registered, schemas checked by opcheck, torch.compile."""

import pytest
import torch

from ddim_fast import backends, ops
from ddim_fast.ops.extension import _load_extension, has_native_kernel

pytestmark = pytest.mark.skipif(not _load_extension()[0], reason="the native extension is not built")


def test_operators_are_registered():
    for op in ("ddim_step", "guided_step", "predict_x0", "group_norm_silu", "group_norm_act", "add_group_norm_act", "add_layer_norm", "geglu"):
        assert hasattr(torch.ops.ddim_fast, op)
        assert has_native_kernel(op, "cpu")
    b = backends()
    assert b["cpu"]["available"] and b["torch"]["available"]
    assert set(b) == {"cpu", "cuda", "triton", "torch"}
    assert b["cpu"]["build"] in ("ahead-of-time", "jit-cached", "jit-built") and b["cpu"]["path"]
    if not torch.cuda.is_available():
        assert not b["cuda"]["available"] and b["cuda"]["reason"]


def _step_args(dtype=torch.float32, noise=True, x0=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=dtype)
    m = torch.randn(2, 3, 5, 5, generator=g, dtype=dtype)
    z = torch.randn(2, 3, 5, 5, generator=g)
    out = torch.empty_like(x)
    x0_out = torch.empty_like(x) if x0 else None
    return (x, m, 0.6, 0.8, 0.9, 0.3, 0.0, 0.2 if noise else 0.0, z if noise else None, True, -1.0, 1.0, 0, False, out, x0_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise, x0", [(True, True), (False, False)])
def test_opcheck_ddim_step(dtype, noise, x0):
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step.default, _step_args(dtype, noise, x0))


def test_opcheck_predict_x0():
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.library.opcheck(torch.ops.ddim_fast.predict_x0.default, (x, m, 0.6, 0.8, True, -1.0, 1.0, 2, torch.empty_like(x), torch.empty_like(x)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_group_norm_silu(channels_last):
    x = torch.randn(2, 8, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddim_fast.group_norm_silu.default, (x, 4, torch.randn(8), torch.randn(8), torch.randn(2, 8), 1e-6))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_group_norm_act(channels_last, dtype):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 5, 5).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(2, 8, 5, 5).to(dtype).contiguous(memory_format=fmt)
    w, b = torch.randn(8), torch.randn(8)
    torch.library.opcheck(torch.ops.ddim_fast.group_norm_act.default, (x, 4, w, b, torch.randn(8), 1e-6, False))
    torch.library.opcheck(torch.ops.ddim_fast.add_group_norm_act.default, (x, r, 4, w, b, torch.randn(2, 8), 1e-6, True))


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_opcheck_add_layer_norm_and_geglu(dtype, param_dtype):
    x, r = torch.randn(2, 5, 24).to(dtype), torch.randn(2, 5, 24).to(dtype)
    w, b = torch.randn(24).to(param_dtype), torch.randn(24).to(param_dtype)
    torch.library.opcheck(torch.ops.ddim_fast.add_layer_norm.default, (x, r, w, b, 1e-5))
    torch.library.opcheck(torch.ops.ddim_fast.add_layer_norm.default, (x, r, None, None, 1e-5))
    torch.library.opcheck(torch.ops.ddim_fast.geglu.default, (x,))


def test_native_errors_say_what_was_expected():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"ddim_step: model_output must have x's shape \[2, 3, 4, 4\], got \[2, 3, 4\]"):
        torch.ops.ddim_fast.ddim_step(x, torch.randn(2, 3, 4), 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, False, 0.0, 0.0, 0, False, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="sigma is 0.5 > 0 but no noise tensor"):
        torch.ops.ddim_fast.ddim_step(x, x, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, None, False, 0.0, 0.0, 0, False, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="prediction must be 0 \\(eps\\), 1 \\(x0\\) or 2 \\(v\\), got 7"):
        torch.ops.ddim_fast.ddim_step(x, x, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, False, 0.0, 0.0, 7, False, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="num_groups must divide the number of channels: C = 3, num_groups = 2"):
        torch.ops.ddim_fast.group_norm_silu(x, 2, None, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(3,\), got \[4\]"):
        torch.ops.ddim_fast.group_norm_silu(x, 3, torch.ones(4), None, None, 1e-6)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16, got Double"):
        torch.ops.ddim_fast.group_norm_silu(x.double(), 3, None, None, None, 1e-6)
    y = torch.randn(2, 4, 4, 4)
    with pytest.raises(RuntimeError, match=r"add_group_norm_act: residual must have x's shape \[2, 4, 4, 4\], got \[2, 4, 4\]"):
        torch.ops.ddim_fast.add_group_norm_act(y, torch.randn(2, 4, 4), 2, None, None, None, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"add_group_norm_act: residual must have x's memory layout"):
        torch.ops.ddim_fast.add_group_norm_act(y, torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last), 2, None, None, None, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"group_norm_act: add_bias must have shape \(2, 4\) or \(4,\), got \[3\]"):
        torch.ops.ddim_fast.group_norm_act(y, 2, None, None, torch.randn(3), 1e-6, False)


def test_torch_compile_fullgraph_calls_the_ops():
    def step(x, m, w, b):
        h = ops.group_norm_silu(x, 4, w, b, 1e-6)
        out = torch.empty_like(h)
        torch.ops.ddim_fast.ddim_step(h, m, 0.6, 0.8, 0.9, 0.3, 0.0, 0.0, None, False, 0.0, 0.0, 0, False, out, None)
        return out * 2

    x, m = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    w, b = torch.randn(8), torch.randn(8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, m, w, b), step(x, m, w, b))
