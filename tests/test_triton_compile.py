"""The Triton kernels compile for Hopper (sm_90) on this machine, no GPU needed.

The interpreter checks what the kernels compute; this checks that the real compiler
takes them (types of loop-carried values, constexpr branches, Philox on int64 offsets),
so that the first GPU run does not find a compile error. Runs in a subprocess, without
TRITON_INTERPRET.
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
    from ddim_fast.kernels.group_norm_silu import _group_norm_kernel
    from ddim_fast.kernels.predict_x0 import _predict_x0_kernel

    target = GPUTarget("cuda", 90, 32)
    n = 0

    def build(fn, sig, const):
        global n
        sig = dict(sig)
        sig.update({k: "constexpr" for k in const})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
        assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
        n += 1

    for dt, noise_dt in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")):
        sig = {"x_ptr": f"*{dt}", "m_ptr": f"*{dt}", "z_ptr": f"*{noise_dt}", "out_ptr": f"*{dt}", "x0_ptr": f"*{dt}",
               "coef_ptr": "*fp32", "step_ptr": "*i32", "seed_ptr": "*i64", "n": "i32", "clip_lo": "fp32", "clip_hi": "fp32"}
        for pred, noise, clip in itertools.product((0, 1, 2), (0, 1, 2), (False, True)):
            build(_ddim_step_kernel, sig, {"PREDICTION": pred, "CLIP": clip, "CLIPPED_EPS": clip, "NOISE": noise,
                                           "HAS_XT": noise == 1, "WRITE_X0": pred == 1, "BLOCK": 1024})
        sig = {"x_ptr": f"*{dt}", "m_ptr": f"*{dt}", "x0_ptr": f"*{dt}", "eps_ptr": f"*{dt}", "n": "i32", "sa": "fp32",
               "s1m": "fp32", "clip_lo": "fp32", "clip_hi": "fp32"}
        build(_predict_x0_kernel, sig, {"PREDICTION": 2, "CLIP": True, "WRITE_EPS": True, "BLOCK": 1024})
        sig = {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "s_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": "*fp32", "b_ptr": "*fp32",
               "ab_ptr": "*fp32", "C": "i32", "HW": "i32", "D": "i32", "G": "i32", "stride_c": "i32", "stride_p": "i32",
               "ab_stride_n": "i32", "eps": "fp32"}
        for has_w, has_add, has_res, silu, bp, bd in ((True, True, False, True, 256, 4), (False, False, True, True, 1, 1024),
                                                      (True, False, True, False, 512, 2), (True, True, True, True, 128, 16)):
            build(_group_norm_kernel, sig, {"HAS_W": has_w, "HAS_ADD": has_add, "HAS_RES": has_res, "SILU": silu, "BLOCK_P": bp, "BLOCK_D": bd})
    build(_advance_kernel, {"step_ptr": "*i32", "t_table_ptr": "*i64", "t_ptr": "*i64", "B": "i32"}, {"BLOCK": 64})
    print("compiled", n)
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
