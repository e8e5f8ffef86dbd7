"""Triton kernel of the fused DDIM step: x̂₀, clamp, update and noise in one pass.

Reads x and the model output (and z when the noise comes as a tensor); writes x_prev
(and x̂₀ when asked): 3-5 passes over memory instead of the ~11 of the eager chain.
The step's coefficients come from a device table indexed by a device-side step
counter, so one captured CUDA graph serves every step (ddim_fast.sampling.graph).
Guided (classifier-free guidance), it reads the two halves of the model call on the
doubled batch and forms uncond + w·(cond − uncond) first; w comes from a device scalar,
so a captured graph replays any guidance scale. A multistep solver's history (the
previous step's x̂₀, float32) is read into the update and overwritten with this step's.
The table's columns are core.plan.COEF_COLUMNS, read by their names' indices.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..core import plan as _plan
from ._wrap import placeholder as _placeholder
from ._wrap import traceable as _traceable

NUM_COEFS = _plan.NUM_COEFS
# the columns of a coefficient table row (core.plan.COEF_COLUMNS), as the kernel reads them
_ROW = tl.constexpr(_plan.NUM_COEFS)
_SQRT_ALPHA_T = tl.constexpr(_plan.SQRT_ALPHA_T)
_SQRT_ONE_MINUS_ALPHA_T = tl.constexpr(_plan.SQRT_ONE_MINUS_ALPHA_T)
_C_X0 = tl.constexpr(_plan.C_X0)
_C_EPS = tl.constexpr(_plan.C_EPS)
_C_XT = tl.constexpr(_plan.C_XT)
_SIGMA = tl.constexpr(_plan.SIGMA)
_C_X0_PREV = tl.constexpr(_plan.C_X0_PREV)

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit
def _ddim_step_kernel(
    x_ptr,  # x_t: (n,) fp32/fp16/bf16
    m_ptr,  # model output (eps, x0 or v): like x; guided, its unconditional half
    mc_ptr,  # guided: the conditional half of the model output, like x (read when GUIDED)
    w_ptr,  # guided: fp32 (1,) guidance scale (read when GUIDED)
    z_ptr,  # noise: fp32 or x's dtype, x's layout; this step's at row * z_row_stride; read when NOISE == 1
    out_ptr,  # x_prev: like x; may be x_ptr itself
    x0_ptr,  # x0 prediction out: like x; written when WRITE_X0
    hist_ptr,  # fp32, x's layout: the previous step's x0, read then overwritten; when HISTORY
    coef_ptr,  # fp32 (rows, NUM_COEFS): the coefficients of each step, columns core.plan.COEF_COLUMNS
    step_ptr,  # int32 (1,): the row of coef_ptr this launch uses
    seed_ptr,  # int64 (1,): Philox seed; read when NOISE == 2
    n,  # number of elements
    z_row_stride,  # elements between the noise of consecutive steps (0: one buffer for every step)
    clip_lo,  # clamp range of x0 (used when CLIP)
    clip_hi,
    PREDICTION: tl.constexpr,  # 0 eps, 1 x0, 2 v
    CLIP: tl.constexpr,
    CLIPPED_EPS: tl.constexpr,  # eps recomputed from the clamped x0
    NOISE: tl.constexpr,  # 0 none, 1 from z_ptr, 2 generated here (Philox)
    HAS_XT: tl.constexpr,  # c_xt != 0 somewhere (DDPM posterior mean, inversion)
    WRITE_X0: tl.constexpr,
    GUIDED: tl.constexpr,
    HISTORY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = tl.load(step_ptr)
    c = coef_ptr + row * _ROW
    sa = tl.load(c + _SQRT_ALPHA_T)
    s1m = tl.load(c + _SQRT_ONE_MINUS_ALPHA_T)
    c_x0 = tl.load(c + _C_X0)
    c_eps = tl.load(c + _C_EPS)
    sigma = tl.load(c + _SIGMA)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        w = tl.load(w_ptr)
        m = m + w * (tl.load(mc_ptr + offs, mask=mask, other=0.0).to(tl.float32) - m)
    if PREDICTION == 0:  # eps: x0 = (x - sqrt(1-a) eps) / sqrt(a)
        eps = m
        x0 = (x - s1m * m) / sa
    elif PREDICTION == 1:  # x0: eps = (x - sqrt(a) x0) / sqrt(1-a)
        x0 = m
        eps = (x - sa * m) / s1m
    else:  # v: x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x
        x0 = sa * x - s1m * m
        eps = sa * m + s1m * x
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, clip_lo), clip_hi)
        if CLIPPED_EPS:
            eps = (x - sa * x0) / s1m
    res = c_x0 * x0 + c_eps * eps
    if HAS_XT:
        res += tl.load(c + _C_XT) * x
    if HISTORY:  # a weight of 0 reads nothing (a NaN left in the buffer stays out), as every backend
        c_prev = tl.load(c + _C_X0_PREV)
        res += tl.where(c_prev != 0.0, c_prev * tl.load(hist_ptr + offs, mask=mask, other=0.0), 0.0)
    if NOISE == 1:
        z = tl.load(z_ptr + row.to(tl.int64) * z_row_stride + offs, mask=mask, other=0.0)
        res += sigma * z.to(tl.float32)
    if NOISE == 2:
        # one Philox stream per step: seed + row, element offsets within it
        seed = tl.load(seed_ptr) + row
        res += sigma * tl.randn(seed, offs)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    if HISTORY:  # read above, by this program
        tl.store(hist_ptr + offs, x0, mask=mask)


def _block_and_warps(n: int):
    # memory-bound: 4 elements per thread and 4-8 warps keep enough bytes in flight
    if n >= 1 << 20:
        return 2048, 8
    return 1024, 4


def launch(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coef_table: torch.Tensor,
    step: torch.Tensor,
    out: torch.Tensor,
    *,
    prediction: int,
    clip=None,
    clipped_eps: bool = False,
    noise: torch.Tensor | None = None,
    noise_row_stride: int = 0,
    seed: torch.Tensor | None = None,
    has_xt: bool = True,
    x0_out: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    traceable: bool = False,
):
    """Launch on dense tensors of one layout, coefficients read from coef_table[step].

    coef_table: fp32 (rows, NUM_COEFS) on x's device; step: int32 (1,) on x's device. noise
    (a tensor in x's layout) or seed (int64 (1,), in-kernel Philox) or neither (sigma must
    be 0); noise_row_stride > 0: noise holds one row of x.numel() elements per step
    (a table, (rows, *x.shape)) and the step reads its row. cond and guidance (fp32 (1,) on
    x's device), together: guided, model_output is the unconditional half and cond the
    conditional one. history: fp32 in x's layout, the previous step's x0 (weighted by the
    row's c_x0_prev), overwritten with this step's. out may be x (the step in place).
    Allocates nothing (but a placeholder per device and dtype, once): safe inside a CUDA
    graph capture. traceable: the launch through torch.library.wrap_triton
    (_wrap.py; inside the triton_ops below, for torch.compile).
    """
    n = x.numel()
    if n == 0:
        return out
    if coef_table.dim() != 2 or coef_table.shape[1] != NUM_COEFS:
        raise ValueError(f"ddim_step launch: coef_table must be (rows, {NUM_COEFS}) (core.plan.COEF_COLUMNS), got {tuple(coef_table.shape)}")
    if (cond is None) != (guidance is None):
        raise ValueError("ddim_step launch: cond and guidance go together (a guided step needs both)")
    mode = NOISE_TENSOR if noise is not None else (NOISE_PHILOX if seed is not None else NOISE_NONE)
    block, warps = _block_and_warps(n)
    lo, hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)
    kernel = _traceable(_ddim_step_kernel) if traceable else _ddim_step_kernel

    def unused(dtype):
        return _placeholder(x.device, dtype, traceable)

    kernel[(triton.cdiv(n, block),)](
        x,
        model_output,
        cond if cond is not None else unused(x.dtype),
        guidance if guidance is not None else unused(torch.float32),
        noise if noise is not None else unused(torch.float32),
        out,
        x0_out if x0_out is not None else unused(x.dtype),
        history if history is not None else unused(torch.float32),
        coef_table,
        step,
        seed if seed is not None else unused(torch.int64),
        n,
        noise_row_stride,
        lo,
        hi,
        PREDICTION=prediction,
        CLIP=clip is not None,
        CLIPPED_EPS=bool(clipped_eps and clip is not None),
        NOISE=mode,
        HAS_XT=has_xt,
        WRITE_X0=x0_out is not None,
        GUIDED=cond is not None,
        HISTORY=history is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return out


@triton_op("ddim_fast_triton::ddim_step", mutates_args=("out", "x0_out", "history"))
def ddim_step_op(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coef_table: torch.Tensor,
    step: torch.Tensor,
    noise: Optional[torch.Tensor],
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor],
    prediction: int,
    clip: bool,
    clip_lo: float,
    clip_hi: float,
    clipped_eps: bool,
    has_xt: bool,
    history: Optional[torch.Tensor] = None,
) -> None:
    """launch() as an operator torch.compile traces into (Inductor sees and schedules the
    kernel): torch.ops.ddim_fast_triton.ddim_step."""
    launch(
        x,
        model_output,
        coef_table,
        step,
        out,
        prediction=prediction,
        clip=(clip_lo, clip_hi) if clip else None,
        clipped_eps=clipped_eps,
        noise=noise,
        has_xt=has_xt,
        x0_out=x0_out,
        history=history,
        traceable=True,
    )


@triton_op("ddim_fast_triton::guided_step", mutates_args=("out", "x0_out", "history"))
def guided_step_op(
    x: torch.Tensor,
    uncond: torch.Tensor,
    cond: torch.Tensor,
    guidance: torch.Tensor,
    coef_table: torch.Tensor,
    step: torch.Tensor,
    noise: Optional[torch.Tensor],
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor],
    prediction: int,
    clip: bool,
    clip_lo: float,
    clip_hi: float,
    clipped_eps: bool,
    has_xt: bool,
    history: Optional[torch.Tensor] = None,
) -> None:
    """The guided launch() as an operator: torch.ops.ddim_fast_triton.guided_step."""
    launch(
        x,
        uncond,
        coef_table,
        step,
        out,
        prediction=prediction,
        clip=(clip_lo, clip_hi) if clip else None,
        clipped_eps=clipped_eps,
        noise=noise,
        has_xt=has_xt,
        x0_out=x0_out,
        cond=cond,
        guidance=guidance,
        history=history,
        traceable=True,
    )


def ddim_step(x, model_output, coefs, noise, clip, prediction: int, clipped_eps: bool, out, x0_out=None, *, cond=None, guidance: float = 0.0, history=None):
    """Eager entry (ops.ddim_step / ops.guided_step with backend="triton"): coefs as one row of
    NUM_COEFS Python floats (core.plan.COEF_COLUMNS); with cond, guided with scale `guidance`.

    Checked, dense, same-layout arguments (ddim_fast.ops does the checking).
    """
    table = torch.tensor([coefs], dtype=torch.float32, device=x.device)
    step = torch.zeros(1, dtype=torch.int32, device=x.device)
    lo, hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)
    noise = noise if coefs[_plan.SIGMA] != 0 else None
    has_xt = coefs[_plan.C_XT] != 0
    if cond is None:
        ddim_step_op(x, model_output, table, step, noise, out, x0_out, prediction, clip is not None, lo, hi, bool(clipped_eps), has_xt, history)
    else:
        w = torch.tensor([guidance], dtype=torch.float32, device=x.device)
        guided_step_op(x, model_output, cond, w, table, step, noise, out, x0_out, prediction, clip is not None, lo, hi, bool(clipped_eps), has_xt, history)
    return out


def advance(step: torch.Tensor, t_table: torch.Tensor, t_buf: torch.Tensor):
    """step += 1; t_buf[:] = t_table[step]: the captured loop's move to the next step."""
    batch = t_buf.numel()
    _advance_kernel[(1,)](step, t_table, t_buf, batch, BLOCK=triton.next_power_of_2(max(batch, 16)), num_warps=1)


@triton.jit
def _advance_kernel(
    step_ptr,  # int32 (1,): incremented in place
    t_table_ptr,  # int64 or float32 (rows, B): the timesteps of each step (one spare row at the end)
    t_ptr,  # like t_table (B,): the model's timestep input, overwritten with the next row
    B,  # batch size
    BLOCK: tl.constexpr,
):
    # Every thread reads the counter and one writes it back: the barrier keeps that write
    # after every thread's read (without it, with more than one warp, a late warp could
    # read the new counter and copy the row after next). Launched with one warp as well.
    row = tl.load(step_ptr) + 1
    offs = tl.arange(0, BLOCK)
    mask = offs < B
    tl.store(t_ptr + offs, tl.load(t_table_ptr + row * B + offs, mask=mask), mask=mask)
    tl.debug_barrier()
    tl.store(step_ptr, row)
