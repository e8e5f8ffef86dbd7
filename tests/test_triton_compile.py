"""The Triton kernels compile for Hopper (sm_90) on this machine, no GPU needed, and
torch.compile can see them.

The interpreter checks what the kernels compute; this checks that the real compiler
takes them (types of loop-carried values, constexpr branches, Philox on int64 offsets),
so that the first GPU run does not find a compile error, and that the torch.library
triton_ops behind backend="triton" decompose into their kernels when functionalized, as
AOTAutograd hands them to Inductor (traced on fake CUDA tensors). Both run in a
subprocess, without TRITON_INTERPRET (under the interpreter wrap_triton steps aside).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import requires_triton

SCRIPT = textwrap.dedent(
    '''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ddim_fast.kernels.ddim_step import _ddim_step_kernel, _advance_kernel
    from ddim_fast.kernels.group_norm_silu import _gn_normalize_kernel, _gn_one_pass_kernel, _gn_partial_stats_kernel
    from ddim_fast.kernels.predict_x0 import _predict_x0_kernel
    from ddim_fast.kernels.layer_norm import _add_layer_norm_rows_kernel, _add_layer_norm_wide_kernel
    from ddim_fast.kernels.geglu import _geglu_kernel

    target = GPUTarget("cuda", 90, 32)
    n = 0

    def build(fn, sig, const, **options):
        global n
        sig = dict(sig)
        sig.update({k: "constexpr" for k in const})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target, options=options or None)
        assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
        n += 1
        return k

    for dt, noise_dt in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")):
        sig = {"x_ptr": f"*{dt}", "m_ptr": f"*{dt}", "mc_ptr": f"*{dt}", "w_ptr": "*fp32", "z_ptr": f"*{noise_dt}", "out_ptr": f"*{dt}",
               "x0_ptr": f"*{dt}", "hist_ptr": "*fp32", "coef_ptr": "*fp32", "step_ptr": "*i32", "seed_ptr": "*i64", "n": "i32", "z_row_stride": "i32",
               "clip_lo": "fp32", "clip_hi": "fp32"}
        for pred, noise, clip in itertools.product((0, 1, 2), (0, 1, 2), (False, True)):
            build(_ddim_step_kernel, sig, {"PREDICTION": pred, "CLIP": clip, "CLIPPED_EPS": clip, "NOISE": noise,
                                           "HAS_XT": noise != 1, "WRITE_X0": pred == 1, "GUIDED": noise != 1,
                                           "HISTORY": noise == 0, "BLOCK": 1024})
        sig = {"x_ptr": f"*{dt}", "m_ptr": f"*{dt}", "x0_ptr": f"*{dt}", "eps_ptr": f"*{dt}", "n": "i32", "sa": "fp32",
               "s1m": "fp32", "clip_lo": "fp32", "clip_hi": "fp32"}
        build(_predict_x0_kernel, sig, {"PREDICTION": 2, "CLIP": True, "WRITE_EPS": True, "BLOCK": 1024})
        gn = {"C": "i32", "HW": "i32", "D": "i32", "G": "i32", "stride_c": "i32", "stride_p": "i32", "ab_stride_n": "i32"}
        sig = {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "s_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": "*fp32", "b_ptr": "*fp32",
               "ab_ptr": "*fp32", **gn, "eps": "fp32"}
        for has_add, has_res, silu, gpb, bp, bd in ((True, False, True, 1, 1024, 4), (False, True, True, 4, 1024, 4),
                                                    (True, True, False, 2, 256, 16), (True, True, True, 1, 1, 16384)):
            build(_gn_one_pass_kernel, sig, {"HAS_ADD": has_add, "HAS_RES": has_res, "SILU": silu, "GPB": gpb, "BLOCK_P": bp, "BLOCK_D": bd})
        sig = {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "s_ptr": f"*{dt}", "ab_ptr": "*fp32", "part_ptr": "*fp32", **gn,
               "CHUNK": "i32", "SPLIT": "i32"}
        for has_add, has_res, bp, bd in ((True, False, 1024, 4), (False, True, 256, 16)):
            build(_gn_partial_stats_kernel, sig, {"HAS_ADD": has_add, "HAS_RES": has_res, "BLOCK_P": bp, "BLOCK_D": bd})
        sig = {"src_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": "*fp32", "b_ptr": "*fp32", "ab_ptr": "*fp32", "part_ptr": "*fp32",
               **gn, "CHUNK": "i32", "SPLIT": "i32", "eps": "fp32"}
        for has_add, silu, bs, bp, bd in ((True, True, 8, 1024, 4), (False, False, 1, 256, 16)):
            build(_gn_normalize_kernel, sig, {"HAS_ADD": has_add, "SILU": silu, "BLOCK_S": bs, "BLOCK_P": bp, "BLOCK_D": bd})
        for param_dt in ("fp32", dt):
            sig = {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "s_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{param_dt}", "b_ptr": f"*{param_dt}",
                   "rows": "i32", "D": "i32", "eps": "fp32"}
            for has_w, br, bd in ((True, 4, 512), (False, 1, 16384)):
                build(_add_layer_norm_rows_kernel, sig, {"HAS_W": has_w, "HAS_B": has_w, "BLOCK_R": br, "BLOCK_D": bd})
            sig = {k: v for k, v in sig.items() if k != "rows"}
            build(_add_layer_norm_wide_kernel, sig, {"HAS_W": True, "HAS_B": False, "BLOCK_D": 2048})
        build(_geglu_kernel, {"h_ptr": f"*{dt}", "out_ptr": f"*{dt}", "rows": "i32", "F": "i32"}, {"BLOCK_R": 1, "BLOCK_F": 2048})
    advance = build(_advance_kernel, {"step_ptr": "*i32", "t_table_ptr": "*i64", "t_ptr": "*i64", "B": "i32"}, {"BLOCK": 64}, num_warps=1)
    # the counter is stored after a barrier, so that no thread can read it after the store
    ptx = advance.asm["ptx"]
    barrier = max(ptx.rfind("bar.sync"), ptx.rfind("barrier.sync"))
    assert 0 <= barrier < ptx.rfind("st.global"), "the advance kernel stores its counter before a barrier"
    print("compiled", n)
    '''
)


TRACE_SCRIPT = textwrap.dedent(
    '''
    import collections
    import logging
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from ddim_fast import ops
    import ddim_fast.ops.dispatch as dispatch
    import ddim_fast.kernels.group_norm_silu as gn

    # no GPU here: the Triton backend taken as present, the launch planned as for an H100,
    # and the kernels' mutation analysis (which needs a GPU driver) left to assume the worst
    dispatch.triton_status = lambda: (True, "")
    gn._programs = lambda device: 264
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)

    def every_op(x, eps, w, b, r):
        h = ops.group_norm_silu(x, 4, w, b, 1e-6, add_bias=w, backend="triton")
        g = ops.group_norm_act(h, 4, w, b, 1e-6, silu=False, backend="triton")
        s, y = ops.group_norm_act(g, 4, w, b, 1e-6, silu=True, residual=r, backend="triton")
        t, n = ops.add_layer_norm(s, y, eps=1e-5, backend="triton")
        gated = ops.geglu(torch.cat([t, n], dim=-1), backend="triton")
        x0 = ops.predict_x0(gated, eps, 0.6, clip=(-1.0, 1.0), backend="triton")
        return ops.ddim_step(s, eps, 0.6, 0.8, 0.1, noise=x0, x0_out=torch.empty_like(x), backend="triton") + x0

    with FakeTensorMode():
        shape = (2, 8, 5, 5)
        args = [torch.empty(shape, device="cuda"), torch.empty(shape, device="cuda"), torch.empty(8, device="cuda"),
                torch.empty(8, device="cuda"), torch.empty(shape, device="cuda")]
    opaque = make_fx(every_op, tracing_mode="fake")(*args)
    seen = collections.Counter(str(n.target) for n in opaque.graph.nodes if n.op == "call_function" and "ddim_fast_triton" in str(n.target))
    print("ops", dict(sorted(seen.items())))
    functional = make_fx(dispatch_functionalize(every_op), tracing_mode="fake")(*args)
    names = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in functional.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    left = [str(n.target) for n in functional.graph.nodes if "ddim_fast" in str(n.target)]
    print("kernels", names, "left", left)
    '''
)


def _nvidia_backend_present():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


@requires_triton
@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_present(), reason="this triton has no NVIDIA backend (ptxas)")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout


@requires_triton
@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_present(), reason="this triton has no NVIDIA backend")
def test_triton_ops_decompose_into_their_kernels_for_inductor():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("ops ", "kernels ")))
    # traced as operators: one call per entry point, none broken up or run eagerly
    assert lines["ops"] == str(
        {
            "ddim_fast_triton.add_group_norm_act.default": 1,
            "ddim_fast_triton.add_layer_norm.default": 1,
            "ddim_fast_triton.ddim_step.default": 1,
            "ddim_fast_triton.geglu.default": 1,
            "ddim_fast_triton.group_norm_act.default": 2,
            "ddim_fast_triton.predict_x0.default": 1,
        }
    ), res.stdout
    # functionalized: only the kernels are left, where Inductor can schedule them
    assert lines["kernels"] == str(["_gn_one_pass_kernel"] * 3 + ["_add_layer_norm_rows_kernel", "_geglu_kernel", "_predict_x0_kernel", "_ddim_step_kernel"]) + " left []", res.stdout
