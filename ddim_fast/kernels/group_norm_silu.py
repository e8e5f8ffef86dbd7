"""Triton kernels of (residual add +) (bias add +) GroupNorm (+ SiLU), NCHW or channels_last.

Two plans, picked by `plan()` from the shape:

- one pass, when a program can hold its groups on chip (at most ONE_PASS_MAX values):
  one program per (n, GPB groups) loads the whole [HW, GPB*D] tile once, takes each
  group's mean and then its centred second moment from registers (an exact two-pass
  variance, no cancellation whatever the mean), and writes y. Reads x once, writes y
  once: 2 passes, where aten's GroupNorm + SiLU take 5 (GroupNorm 2R+1W, SiLU 1R+1W).
  In channels_last a pixel's D channels are only D*itemsize bytes (8 for bf16 at D = 4),
  so when there are programs to spare one program takes GPB adjacent groups and reads
  rows of GPB*D channels: whole 32-byte sectors instead of a quarter of each.
- split, for larger groups: the group's pixels are cut into SPLIT chunks so that there
  are enough programs to fill the GPU whatever the batch. A first kernel writes each
  chunk's (count, mean, M2) (Welford moments, merged tile by tile with Chan's formula);
  a second merges a group's SPLIT partials the same way and normalises its chunk. Reads
  x twice (the second mostly from L2), writes y once.

With a residual, the kernel that first reads x forms s = x + residual, stores it
(rounded to x's dtype, as a separate add would) and normalises the stored sum: one op
for an add and a norm, 2R+2W in the one-pass plan where the add alone is 2R+1W.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._wrap import placeholder as _placeholder
from ._wrap import traceable as _traceable

ONE_PASS_MAX = 16384  # values one program holds (padded tile size): 32 fp32 registers per thread at 16 warps
SPLIT_TILE = 4096  # values per tile of the split kernels' loops
_SECTOR_BYTES = 64  # a channels_last row this wide is read in whole sectors


@triton.jit
def _gn_one_pass_kernel(
    x_ptr,  # (N, C, HW) as laid out: element (n, c, p) at n*C*HW + c*stride_c + p*stride_p
    r_ptr,  # residual, x's layout; read when HAS_RES
    s_ptr,  # x + residual, x's layout; written when HAS_RES
    y_ptr,  # output, x's layout
    w_ptr,  # fp32 (C,) weight
    b_ptr,  # fp32 (C,) bias
    ab_ptr,  # fp32 bias added before the norm: row n at n * ab_stride_n; read when HAS_ADD
    C,  # channels
    HW,  # spatial size (H * W)
    D,  # channels per group (C // G)
    G,  # groups
    stride_c,  # HW for NCHW, 1 for channels_last
    stride_p,  # 1 for NCHW, C for channels_last
    ab_stride_n,  # C for an (N, C) add_bias, 0 for one (C,) row shared by every sample
    eps,  # GroupNorm epsilon
    HAS_ADD: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU: tl.constexpr,
    GPB: tl.constexpr,  # groups per program (a power of two dividing G)
    BLOCK_P: tl.constexpr,  # >= HW, a power of two
    BLOCK_D: tl.constexpr,  # >= D, a power of two
):
    pid = tl.program_id(0)
    programs_per_n = G // GPB
    n = pid // programs_per_n
    g0 = (pid % programs_per_n) * GPB
    p = tl.arange(0, BLOCK_P)
    j = tl.arange(0, GPB * BLOCK_D)  # (group in the tile, channel in the group), padded to BLOCK_D
    d = j % BLOCK_D
    ch = (g0 + j // BLOCK_D) * D + d
    ch_mask = d < D
    mask = (p < HW)[:, None] & ch_mask[None, :]
    offs = n.to(tl.int64) * C * HW + p[:, None].to(tl.int64) * stride_p + ch[None, :].to(tl.int64) * stride_c
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        xv = (xv.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
        tl.store(s_ptr + offs, xv, mask=mask)  # the norm sees the stored (rounded) sum
    v = xv.to(tl.float32)
    if HAS_ADD:
        v += tl.load(ab_ptr + n * ab_stride_n + ch, mask=ch_mask, other=0.0)[None, :]
    count = HW * D * 1.0
    # per group: the channel sums of the tile, summed over the group's D channels
    gsum = tl.sum(tl.reshape(tl.sum(tl.where(mask, v, 0.0), axis=0), (GPB, BLOCK_D)), axis=1)
    mean = tl.reshape(tl.broadcast_to((gsum / count)[:, None], (GPB, BLOCK_D)), (GPB * BLOCK_D,))
    dv = tl.where(mask, v - mean[None, :], 0.0)
    gm2 = tl.sum(tl.reshape(tl.sum(dv * dv, axis=0), (GPB, BLOCK_D)), axis=1)
    rstd = tl.reshape(tl.broadcast_to((1.0 / tl.sqrt(gm2 / count + eps))[:, None], (GPB, BLOCK_D)), (GPB * BLOCK_D,))
    w = tl.load(w_ptr + ch, mask=ch_mask, other=0.0)
    b = tl.load(b_ptr + ch, mask=ch_mask, other=0.0)
    h = dv * (w * rstd)[None, :] + b[None, :]
    if SILU:
        h = h / (1.0 + tl.exp(-h))
    tl.store(y_ptr + offs, h.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_partial_stats_kernel(
    x_ptr,  # as in _gn_one_pass_kernel
    r_ptr,  # residual; read when HAS_RES
    s_ptr,  # x + residual; written when HAS_RES
    ab_ptr,  # fp32 bias added before the norm; read when HAS_ADD
    part_ptr,  # fp32 (N*G, SPLIT, 3): (count, mean, M2) of each chunk
    C,  # channels
    HW,  # spatial size
    D,  # channels per group
    G,  # groups
    stride_c,  # HW for NCHW, 1 for channels_last
    stride_p,  # 1 for NCHW, C for channels_last
    ab_stride_n,  # C or 0
    CHUNK,  # pixels per chunk (a multiple of BLOCK_P)
    SPLIT,  # chunks per group
    HAS_ADD: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_D: tl.constexpr,  # >= D, a power of two
):
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // G
    g = ng % G
    base = n.to(tl.int64) * C * HW + (g * D).to(tl.int64) * stride_c
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    if HAS_ADD:
        ab = tl.load(ab_ptr + n * ab_stride_n + g * D + d, mask=d_mask, other=0.0)
    else:
        ab = tl.zeros([BLOCK_D], dtype=tl.float32)
    # running (count, mean, M2) over tiles of BLOCK_P pixels x D channels
    mean = 0.0
    m2 = 0.0
    count = 0.0
    p_end = tl.minimum(chunk * CHUNK + CHUNK, HW)
    for p0 in range(chunk * CHUNK, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < p_end)[:, None] & d_mask[None, :]
        offs = base + p[:, None].to(tl.int64) * stride_p + d[None, :].to(tl.int64) * stride_c
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if HAS_RES:
            xv = (xv.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
            tl.store(s_ptr + offs, xv, mask=mask)
        v = xv.to(tl.float32) + ab[None, :]
        cnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        t_mean = tl.sum(tl.sum(tl.where(mask, v, 0.0), axis=1), axis=0) / cnt
        dv = tl.where(mask, v - t_mean, 0.0)
        t_m2 = tl.sum(tl.sum(dv * dv, axis=1), axis=0)
        delta = t_mean - mean
        tot = count + cnt
        mean += delta * cnt / tot
        m2 += t_m2 + delta * delta * count * cnt / tot
        count = tot
    out = part_ptr + (ng.to(tl.int64) * SPLIT + chunk) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _gn_normalize_kernel(
    src_ptr,  # what the norm reads: x, or the stored x + residual
    y_ptr,  # output, x's layout
    w_ptr,  # fp32 (C,) weight
    b_ptr,  # fp32 (C,) bias
    ab_ptr,  # fp32 bias added before the norm; read when HAS_ADD
    part_ptr,  # fp32 (N*G, SPLIT, 3) from _gn_partial_stats_kernel
    C,  # channels
    HW,  # spatial size
    D,  # channels per group
    G,  # groups
    stride_c,  # HW for NCHW, 1 for channels_last
    stride_p,  # 1 for NCHW, C for channels_last
    ab_stride_n,  # C or 0
    CHUNK,  # pixels per chunk
    SPLIT,  # chunks per group
    eps,  # GroupNorm epsilon
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= SPLIT, a power of two
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_D: tl.constexpr,  # >= D, a power of two
):
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // G
    g = ng % G
    # the group's moments from its chunks' (Chan's formula, all at once)
    k = tl.arange(0, BLOCK_S)
    k_mask = k < SPLIT
    parts = part_ptr + (ng.to(tl.int64) * SPLIT + k) * 3
    cnts = tl.load(parts, mask=k_mask, other=0.0)
    means = tl.load(parts + 1, mask=k_mask, other=0.0)
    m2s = tl.load(parts + 2, mask=k_mask, other=0.0)
    count = tl.sum(cnts, axis=0)
    mean = tl.sum(cnts * means, axis=0) / count
    m2 = tl.sum(m2s + cnts * (means - mean) * (means - mean), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    base = n.to(tl.int64) * C * HW + (g * D).to(tl.int64) * stride_c
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    if HAS_ADD:
        ab = tl.load(ab_ptr + n * ab_stride_n + g * D + d, mask=d_mask, other=0.0)
    else:
        ab = tl.zeros([BLOCK_D], dtype=tl.float32)
    w = tl.load(w_ptr + g * D + d, mask=d_mask, other=0.0)
    b = tl.load(b_ptr + g * D + d, mask=d_mask, other=0.0)
    # y = act(x * scale + shift), per channel
    scale = w * rstd
    shift = (ab - mean) * scale + b
    p_end = tl.minimum(chunk * CHUNK + CHUNK, HW)
    for p0 in range(chunk * CHUNK, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < p_end)[:, None] & d_mask[None, :]
        offs = base + p[:, None].to(tl.int64) * stride_p + d[None, :].to(tl.int64) * stride_c
        h = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
        if SILU:
            h = h / (1.0 + tl.exp(-h))
        tl.store(y_ptr + offs, h.to(y_ptr.dtype.element_ty), mask=mask)


class Plan(NamedTuple):
    """How group_norm_act launches: "one_pass" with `gpb` groups per program, or "split"
    into `split` chunks of `chunk` pixels per group."""

    kind: str
    gpb: int = 1
    split: int = 1
    chunk: int = 0
    block_p: int = 1
    block_d: int = 1


def _num_warps(values: int) -> int:
    return 4 if values <= 2048 else (8 if values <= 8192 else 16)


def plan(N: int, C: int, HW: int, G: int, itemsize: int, channels_last: bool, programs: int) -> Plan:
    """The launch plan for x (N, C, HW) in G groups; `programs` is how many programs fill
    the GPU (two per SM)."""
    D = C // G
    block_d = triton.next_power_of_2(D)
    block_p = triton.next_power_of_2(max(HW, 1))
    if block_p * block_d <= ONE_PASS_MAX:
        gpb = 1
        if channels_last:  # wider rows while there are programs to spare
            while (
                G % (2 * gpb) == 0
                and gpb * D * itemsize < _SECTOR_BYTES
                and 2 * gpb * block_d * block_p <= ONE_PASS_MAX
                and N * G // (2 * gpb) >= programs
            ):
                gpb *= 2
        return Plan("one_pass", gpb=gpb, block_p=block_p, block_d=block_d)
    tile_p = max(1, min(block_p, SPLIT_TILE // block_d))
    tiles = triton.cdiv(HW, tile_p)
    split = max(1, min(tiles, triton.cdiv(programs, N * G)))
    chunk = triton.cdiv(tiles, split) * tile_p
    return Plan("split", split=triton.cdiv(HW, chunk), chunk=chunk, block_p=tile_p, block_d=block_d)


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 264  # the interpreter: as an H100 (132 SMs) would plan


def _direct(kernel):
    return kernel


def group_norm_act(x: torch.Tensor, num_groups: int, weight, bias, eps: float, add_bias=None, residual=None, silu: bool = True, *, launch_plan: Plan = None, traceable: bool = False):
    """Checked arguments (ddim_fast.ops does the checking); x contiguous or channels_last and a
    residual laid out like x. Returns y, or (x + residual, y) with a residual. launch_plan
    overrides plan() (tests use it to reach every path on small shapes); traceable: the
    launches through torch.library.wrap_triton (inside the triton_ops below)."""
    run = _traceable if traceable else _direct
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // max(N * C, 1)
    y = torch.empty_like(x)  # keeps channels_last
    s = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return y if s is None else (s, y)
    channels_last = not x.is_contiguous()
    stride_c, stride_p = (1, C) if channels_last else (HW, 1)
    G = num_groups
    D = C // G
    f32 = dict(dtype=torch.float32, device=x.device)
    w = weight.to(**f32).contiguous() if weight is not None else torch.ones(C, **f32)
    b = bias.to(**f32).contiguous() if bias is not None else torch.zeros(C, **f32)
    ab_stride_n = C if add_bias is not None and add_bias.dim() == 2 else 0
    has_add, has_res = add_bias is not None, residual is not None
    # pointers whose flag is off get placeholders, never another argument (_wrap.py)
    ab = add_bias.to(**f32).contiguous() if has_add else _placeholder(x.device, torch.float32, traceable)
    r = residual if has_res else _placeholder(x.device, x.dtype, traceable)
    s_out = s if has_res else _placeholder(x.device, x.dtype, traceable)
    geometry = (C, HW, D, G, stride_c, stride_p, ab_stride_n)  # the arguments every kernel takes after its pointers
    p = launch_plan or plan(N, C, HW, G, x.element_size(), channels_last, _programs(x.device))
    if p.kind == "one_pass":
        run(_gn_one_pass_kernel)[(N * G // p.gpb,)](
            x,
            r,
            s_out,
            y,
            w,
            b,
            ab,
            *geometry,
            float(eps),
            HAS_ADD=has_add,
            HAS_RES=has_res,
            SILU=silu,
            GPB=p.gpb,
            BLOCK_P=p.block_p,
            BLOCK_D=p.block_d,
            num_warps=_num_warps(p.gpb * p.block_d * p.block_p),
        )
        return y if s is None else (s, y)
    parts = torch.empty(N * G, p.split, 3, **f32)
    grid = (N * G, p.split)
    warps = _num_warps(p.block_p * p.block_d)
    run(_gn_partial_stats_kernel)[grid](
        x,
        r,
        s_out,
        ab,
        parts,
        *geometry,
        p.chunk,
        p.split,
        HAS_ADD=has_add,
        HAS_RES=has_res,
        BLOCK_P=p.block_p,
        BLOCK_D=p.block_d,
        num_warps=warps,
    )
    run(_gn_normalize_kernel)[grid](
        s if has_res else x,
        y,
        w,
        b,
        ab,
        parts,
        *geometry,
        p.chunk,
        p.split,
        float(eps),
        HAS_ADD=has_add,
        SILU=silu,
        BLOCK_S=triton.next_power_of_2(p.split),
        BLOCK_P=p.block_p,
        BLOCK_D=p.block_d,
        num_warps=warps,
    )
    return y if s is None else (s, y)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight, bias, eps: float, add_bias=None) -> torch.Tensor:
    """silu(group_norm(x + add_bias)); see group_norm_act."""
    return group_norm_act(x, num_groups, weight, bias, eps, add_bias)


# The operators torch.compile traces into (Inductor sees and schedules the kernels):
# torch.ops.ddim_fast_triton.group_norm_act and .add_group_norm_act, the entries of
# ops.group_norm_silu / group_norm_act with backend="triton".


@triton_op("ddim_fast_triton::group_norm_act", mutates_args=())
def group_norm_act_op(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], add_bias: Optional[torch.Tensor], eps: float, silu: bool
) -> torch.Tensor:
    return group_norm_act(x, num_groups, weight, bias, eps, add_bias, None, silu, traceable=True)


@triton_op("ddim_fast_triton::add_group_norm_act", mutates_args=())
def add_group_norm_act_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    add_bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return group_norm_act(x, num_groups, weight, bias, eps, add_bias, residual, silu, traceable=True)
