"""Triton kernel of geglu: out = a * gelu(gate) for h = [a, gate] along the last dimension
of a contiguous (rows, 2F) activation, the exact (erf) GELU that diffusers' GEGLU applies,
in fp32 and rounded once. Reads h once and writes out once: 1R+1W where a GELU and a
product take 3R+2W in two launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._wrap import traceable as _traceable

TILE = 2048  # outputs per program


@triton.jit
def _geglu_kernel(
    h_ptr,  # (rows, 2F), contiguous: row i is [a_i, gate_i]
    out_ptr,  # (rows, F), contiguous
    rows,  # number of rows
    F,  # half of h's row length
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_F: tl.constexpr,  # columns per program, a power of two
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (row < rows)[:, None] & (col < F)[None, :]
    row64 = row[:, None].to(tl.int64)
    a_offs = row64 * (2 * F) + col[None, :]
    a = tl.load(h_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + a_offs + F, mask=mask, other=0.0).to(tl.float32)
    # gelu(g) = g (1 + erf(g / sqrt 2)) / 2
    out = a * 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(out_ptr + row64 * F + col[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _direct(kernel):
    return kernel


def geglu(h: torch.Tensor, *, traceable: bool = False) -> torch.Tensor:
    """Checked arguments (ddim_fast.ops does the checking): h contiguous, its last
    dimension even. Returns out, h's shape with the last dimension halved."""
    run = _traceable if traceable else _direct
    F = h.shape[-1] // 2
    out = h.new_empty((*h.shape[:-1], F))
    if out.numel() == 0:
        return out
    rows = out.numel() // F
    block_f = min(triton.next_power_of_2(F), TILE)
    block_r = max(1, min(TILE // block_f, triton.next_power_of_2(rows)))
    run(_geglu_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(F, block_f))](
        h,
        out,
        rows,
        F,
        BLOCK_R=block_r,
        BLOCK_F=block_f,
        num_warps=4 if block_r * block_f <= 1024 else 8,
    )
    return out


# The operator torch.compile traces into: torch.ops.ddim_fast_triton.geglu, the entry of
# ops.geglu with backend="triton".


@triton_op("ddim_fast_triton::geglu", mutates_args=())
def geglu_op(h: torch.Tensor) -> torch.Tensor:
    return geglu(h, traceable=True)
