"""Triton kernel of (residual add +) (bias add +) GroupNorm (+ SiLU), NCHW or channels_last.

One program per (n, group): a statistics pass over the group's D*HW values (fp32,
merged tile by tile with Chan's parallel formula, so a large mean does not cancel the
variance), then an output pass; the second read of a group mostly hits L2. Reads x
twice, writes y once, instead of GroupNorm's 2R+1W plus SiLU's 1R+1W (plus the bias
add's 1R+1W in the ResNet block). With a residual, the statistics pass forms
s = x + residual, stores it (rounded to x's dtype, as a separate add would) and the
output pass reads s back: 2R+1W for the sum and 1R+1W for y in one kernel, where an add
and a norm take 2R+1W and 2R+1W.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_norm_kernel(
    x_ptr,  # (N, C, HW) as laid out: element (n, c, p) at n*C*HW + c*stride_c + p*stride_p
    r_ptr,  # residual, x's layout; read when HAS_RES
    s_ptr,  # x + residual, x's layout; written when HAS_RES
    y_ptr,  # output, x's layout
    w_ptr,  # fp32 (C,) weight; read when HAS_W
    b_ptr,  # fp32 (C,) bias; read when HAS_W
    ab_ptr,  # fp32 bias added before the norm: row n at n * ab_stride_n; read when HAS_ADD
    C,  # channels
    HW,  # spatial size (H * W)
    D,  # channels per group (C // G)
    G,  # groups
    stride_c,  # HW for NCHW, 1 for channels_last
    stride_p,  # 1 for NCHW, C for channels_last
    ab_stride_n,  # C for an (N, C) add_bias, 0 for one (C,) row shared by every sample
    eps,  # GroupNorm epsilon
    HAS_W: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_D: tl.constexpr,  # channels per tile (>= D, a power of two)
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * C * HW + (g * D).to(tl.int64) * stride_c
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    ch = g * D + d
    if HAS_ADD:
        ab = tl.load(ab_ptr + n * ab_stride_n + ch, mask=d_mask, other=0.0)
    else:
        ab = tl.zeros([BLOCK_D], dtype=tl.float32)

    # statistics: running (count, mean, M2), one tile of BLOCK_P pixels x D channels at a time
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < HW)[:, None] & d_mask[None, :]
        offs = base + p[:, None].to(tl.int64) * stride_p + d[None, :].to(tl.int64) * stride_c
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if HAS_RES:
            sv = (xv.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(xv.dtype)
            tl.store(s_ptr + offs, sv, mask=mask)
            xv = sv  # the norm sees the stored (rounded) sum
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
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    if HAS_W:
        w = tl.load(w_ptr + ch, mask=d_mask, other=0.0)
        b = tl.load(b_ptr + ch, mask=d_mask, other=0.0)
    else:
        w = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
        b = tl.zeros([BLOCK_D], dtype=tl.float32)
    # y = act(x * scale + shift), per channel
    scale = w * rstd
    shift = (ab - mean) * scale + b
    if HAS_RES:
        tl.debug_barrier()  # the program's stores of s are visible to all its threads before they read s back
        src_ptr = s_ptr
    else:
        src_ptr = x_ptr
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < HW)[:, None] & d_mask[None, :]
        offs = base + p[:, None].to(tl.int64) * stride_p + d[None, :].to(tl.int64) * stride_c
        h = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
        if SILU:
            h = h / (1.0 + tl.exp(-h))
        tl.store(y_ptr + offs, h.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_act(x: torch.Tensor, num_groups: int, weight, bias, eps: float, add_bias=None, residual=None, silu: bool = True):
    """Checked arguments (ddim_fast.ops does the checking); x contiguous or channels_last and a
    residual laid out like x. Returns y, or (x + residual, y) with a residual."""
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // max(N * C, 1)
    y = torch.empty_like(x)  # keeps channels_last
    s = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return y if s is None else (s, y)
    channels_last = not x.is_contiguous()
    stride_c, stride_p = (1, C) if channels_last else (HW, 1)
    D = C // num_groups
    has_w = weight is not None or bias is not None
    f32 = dict(dtype=torch.float32, device=x.device)
    w = weight.to(**f32).contiguous() if weight is not None else torch.ones(C, **f32)
    b = bias.to(**f32).contiguous() if bias is not None else torch.zeros(C, **f32)
    ab = add_bias.to(**f32).contiguous() if add_bias is not None else w
    block_d = triton.next_power_of_2(D)
    block_p = max(1, min(triton.next_power_of_2(HW), 2048 // block_d))
    _group_norm_kernel[(N * num_groups,)](
        x,
        residual if residual is not None else x,
        s if s is not None else y,
        y,
        w,
        b,
        ab,
        C,
        HW,
        D,
        num_groups,
        stride_c,
        stride_p,
        C if add_bias is not None and add_bias.dim() == 2 else 0,
        float(eps),
        HAS_W=has_w,
        HAS_ADD=add_bias is not None,
        HAS_RES=residual is not None,
        SILU=silu,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        num_warps=4 if block_p * block_d <= 1024 else 8,
    )
    return y if s is None else (s, y)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight, bias, eps: float, add_bias=None) -> torch.Tensor:
    """silu(group_norm(x + add_bias)); see group_norm_act."""
    return group_norm_act(x, num_groups, weight, bias, eps, add_bias)
