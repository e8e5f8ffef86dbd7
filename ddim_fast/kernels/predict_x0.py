"""Triton kernel of x̂₀ prediction plus clamp in one pass.

Reads x and the model output; writes x̂₀ (and eps recomputed from the clamped x̂₀,
diffusers' use_clipped_model_output): 3-4 passes instead of the eager chain's 6-8.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._wrap import placeholder as _placeholder
from ._wrap import traceable as _traceable


@triton.jit
def _predict_x0_kernel(
    x_ptr,  # x_t: (n,) fp32/fp16/bf16
    m_ptr,  # model output (eps, x0 or v): like x
    x0_ptr,  # x0 out: like x
    eps_ptr,  # eps out (consistent with the clamped x0): like x; written when WRITE_EPS
    n,  # number of elements
    sa,  # sqrt(alpha_t)
    s1m,  # sqrt(1 - alpha_t)
    clip_lo,  # clamp range (used when CLIP)
    clip_hi,
    PREDICTION: tl.constexpr,  # 0 eps, 1 x0, 2 v
    CLIP: tl.constexpr,
    WRITE_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PREDICTION == 0:
        eps = m
        x0 = (x - s1m * m) / sa
    elif PREDICTION == 1:
        x0 = m
        eps = (x - sa * m) / s1m
    else:
        x0 = sa * x - s1m * m
        eps = sa * m + s1m * x
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, clip_lo), clip_hi)
        eps = (x - sa * x0) / s1m
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    if WRITE_EPS:
        tl.store(eps_ptr + offs, eps.to(eps_ptr.dtype.element_ty), mask=mask)


@triton_op("ddim_fast_triton::predict_x0", mutates_args=("out", "eps_out"))
def predict_x0_op(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sa: float,
    s1m: float,
    clip: bool,
    clip_lo: float,
    clip_hi: float,
    prediction: int,
    out: torch.Tensor,
    eps_out: Optional[torch.Tensor],
) -> None:
    """The kernel as an operator torch.compile traces into: torch.ops.ddim_fast_triton.predict_x0.
    Checked, dense, same-layout arguments (ddim_fast.ops does the checking)."""
    n = x.numel()
    if n == 0:
        return
    block = 1024
    _traceable(_predict_x0_kernel)[(triton.cdiv(n, block),)](
        x,
        model_output,
        out,
        eps_out if eps_out is not None else _placeholder(x.device, x.dtype, traced=True),
        n,
        sa,
        s1m,
        clip_lo,
        clip_hi,
        PREDICTION=prediction,
        CLIP=clip,
        WRITE_EPS=eps_out is not None,
        BLOCK=block,
        num_warps=4,
    )


def predict_x0(x, model_output, sa: float, s1m: float, clip, prediction: int, out, eps_out=None):
    """Eager entry (ops.predict_x0 with backend="triton"); clip None or (lo, hi)."""
    lo, hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)
    predict_x0_op(x, model_output, float(sa), float(s1m), clip is not None, lo, hi, prediction, out, eps_out)
    return out


__all__ = ["predict_x0", "predict_x0_op"]
