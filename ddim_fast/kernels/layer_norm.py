"""Triton kernels of add_layer_norm: a transformer layer's residual add and the LayerNorm
after it, over the last dimension of a contiguous (rows, D) activation.

s = x + residual is stored rounded to x's dtype (as a separate add stores it: it is the next
residual), and the norm takes the stored sum. Reads x and residual once, writes s and y
once: 2R+2W where an add and a LayerNorm take 3R+2W in two launches.

Two plans, picked by `plan()` from D:

- rows, when a row fits on chip (D <= ROW_MAX): one program takes BLOCK_R whole rows,
  takes each row's mean and then its centred second moment from registers (an exact
  two-pass variance, no cancellation whatever the mean) and writes y;
- wide, for longer rows: one program per row loops over it twice: the first loop stores s
  and merges each tile's (count, mean, centred M2) into the row's with Chan's formula (no
  cancellation whatever the mean or an outlier); the second forms s again from x and
  residual, the same rounding, and writes y. Reads x and residual twice, never its own stores.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._wrap import placeholder as _placeholder
from ._wrap import traceable as _traceable

ROW_MAX = 16384  # values of a row one program holds
TILE = 2048  # values per program of the rows plan (BLOCK_R * BLOCK_D), and per loop step of the wide plan


@triton.jit
def _add_layer_norm_rows_kernel(
    x_ptr,  # (rows, D), contiguous
    r_ptr,  # residual, x's shape and dtype
    s_ptr,  # x + residual, written
    y_ptr,  # layer_norm(s), written
    w_ptr,  # (D,) weight, x's dtype or fp32; read when HAS_W
    b_ptr,  # (D,) bias, the weight's dtype; read when HAS_B
    rows,  # number of rows
    D,  # row length
    eps,  # LayerNorm epsilon
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # >= D, a power of two
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    mask = (row < rows)[:, None] & d_mask[None, :]
    offs = row[:, None].to(tl.int64) * D + d[None, :]
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0)
    sv = (xv.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
    tl.store(s_ptr + offs, sv, mask=mask)
    v = sv.to(tl.float32)  # the norm sees the stored (rounded) sum
    mean = tl.sum(v, axis=1) / D
    dv = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(dv * dv, axis=1) / D + eps)
    h = dv * rstd[:, None]
    if HAS_W:
        h = h * tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(b_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, h.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_layer_norm_wide_kernel(
    x_ptr,  # as in _add_layer_norm_rows_kernel
    r_ptr,  # residual
    s_ptr,  # x + residual, written
    y_ptr,  # layer_norm(s), written
    w_ptr,  # (D,) weight; read when HAS_W
    b_ptr,  # (D,) bias; read when HAS_B
    D,  # row length
    eps,  # LayerNorm epsilon
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr,  # values per loop step
):
    base = tl.program_id(0).to(tl.int64) * D
    # the row's running (count, mean, M2), merged tile by tile (Chan's formula)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = d < D
        xv = tl.load(x_ptr + base + d, mask=mask, other=0.0)
        sv = (xv.to(tl.float32) + tl.load(r_ptr + base + d, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
        tl.store(s_ptr + base + d, sv, mask=mask)
        v = sv.to(tl.float32)
        tile_count = tl.sum(mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / tile_count
        dv = tl.where(mask, v - tile_mean, 0.0)
        tile_m2 = tl.sum(dv * dv, axis=0)
        delta = tile_mean - mean
        total = count + tile_count
        mean += delta * tile_count / total
        m2 += tile_m2 + delta * delta * count * tile_count / total
        count = total
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = d < D
        xv = tl.load(x_ptr + base + d, mask=mask, other=0.0)
        sv = (xv.to(tl.float32) + tl.load(r_ptr + base + d, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
        h = (sv.to(tl.float32) - mean) * rstd
        if HAS_W:
            h = h * tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            h = h + tl.load(b_ptr + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + d, h.to(y_ptr.dtype.element_ty), mask=mask)


class Plan(NamedTuple):
    """How add_layer_norm launches: "rows" (`block_r` whole rows of `block_d` per program)
    or "wide" (one program per row, `block_d` values per loop step)."""

    kind: str
    block_r: int = 1
    block_d: int = 1


def plan(rows: int, D: int) -> Plan:
    block_d = triton.next_power_of_2(max(D, 1))
    if block_d <= ROW_MAX:
        block_r = max(1, min(TILE // block_d, triton.next_power_of_2(max(rows, 1))))
        return Plan("rows", block_r=block_r, block_d=block_d)
    return Plan("wide", block_d=TILE)


def _num_warps(values: int) -> int:
    return 4 if values <= 2048 else (8 if values <= 8192 else 16)


def _direct(kernel):
    return kernel


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight, bias, eps: float, *, launch_plan: Plan = None, traceable: bool = False):
    """Checked arguments (ddim_fast.ops does the checking): x and residual contiguous, of one
    shape and dtype; weight and bias (D,) contiguous or None. Returns (s, y). launch_plan
    overrides plan() (tests use it to reach the wide plan on small rows); traceable: the
    launch through torch.library.wrap_triton (inside the triton_op below)."""
    run = _traceable if traceable else _direct
    s = torch.empty_like(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return s, y
    D = x.shape[-1]
    rows = x.numel() // D
    has_w, has_b = weight is not None, bias is not None
    param_dtype = weight.dtype if has_w else (bias.dtype if has_b else torch.float32)
    # pointers whose flag is off get placeholders, never another argument (_wrap.py)
    w = weight if has_w else _placeholder(x.device, param_dtype, traceable)
    b = bias if has_b else _placeholder(x.device, param_dtype, traceable)
    p = launch_plan or plan(rows, D)
    if p.kind == "rows":
        run(_add_layer_norm_rows_kernel)[(triton.cdiv(rows, p.block_r),)](
            x,
            residual,
            s,
            y,
            w,
            b,
            rows,
            D,
            float(eps),
            HAS_W=has_w,
            HAS_B=has_b,
            BLOCK_R=p.block_r,
            BLOCK_D=p.block_d,
            num_warps=_num_warps(p.block_r * p.block_d),
        )
        return s, y
    run(_add_layer_norm_wide_kernel)[(rows,)](
        x,
        residual,
        s,
        y,
        w,
        b,
        D,
        float(eps),
        HAS_W=has_w,
        HAS_B=has_b,
        BLOCK_D=p.block_d,
        num_warps=_num_warps(p.block_d),
    )
    return s, y


# The operator torch.compile traces into: torch.ops.ddim_fast_triton.add_layer_norm, the
# entry of ops.add_layer_norm with backend="triton".


@triton_op("ddim_fast_triton::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_layer_norm(x, residual, weight, bias, eps, traceable=True)
