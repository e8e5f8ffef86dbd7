"""The PyTorch backend of the fused ops: plain tensor code, any device.

Arithmetic in fp32 for fp32/fp16/bf16 storage (float64 stays float64), like the fused
kernels, so every backend gives the same numbers up to rounding; add_layer_norm and geglu
instead run PyTorch's own ops in the storage dtype, as the model they stand in for does
(where the extension is missing they are what the lean SD UNet runs, so they move no more
bytes than the unfused model would).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import plan


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def x0_eps_from(x, m, sa, s1m, prediction: int):
    """(x0, eps) from the model output m at x, for prediction 0 = eps, 1 = x0, 2 = v."""
    if prediction == 0:
        return (x - s1m * m) / sa, m
    if prediction == 1:
        return m, (x - sa * m) / s1m
    return sa * x - s1m * m, sa * m + s1m * x


def ddim_step(x, model_output, coefs, noise, clip, prediction: int, clipped_eps: bool, out, x0_out=None, *, cond=None, guidance: float = 0.0, history=None):
    """out = c_x0 * x0 + c_eps * eps + c_xt * x + c_x0_prev * history + sigma * noise (see
    csrc/ops.cpp); with cond (guided_step), the model output is model_output + guidance *
    (cond - model_output); history (the previous step's x0) is then overwritten with x0."""
    sa, s1m = coefs[plan.SQRT_ALPHA_T], coefs[plan.SQRT_ONE_MINUS_ALPHA_T]
    c_x0, c_eps, c_xt = coefs[plan.C_X0], coefs[plan.C_EPS], coefs[plan.C_XT]
    sigma, c_x0_prev = coefs[plan.SIGMA], coefs[plan.C_X0_PREV]
    cd = _compute_dtype(x.dtype)
    xf, mf = x.to(cd), model_output.to(cd)
    if cond is not None:
        mf = mf + guidance * (cond.to(cd) - mf)
    x0, eps = x0_eps_from(xf, mf, sa, s1m, prediction)
    if clip is not None:
        x0 = x0.clamp(clip[0], clip[1])
        if clipped_eps:
            eps = (xf - sa * x0) / s1m
    res = c_x0 * x0 + c_eps * eps
    if c_xt != 0:
        res = res + c_xt * xf
    if c_x0_prev != 0:
        res = res + c_x0_prev * history.to(cd)
    if sigma != 0:
        res = res + sigma * noise.to(cd)
    if x0_out is not None:
        x0_out.copy_(x0)
    if history is not None:
        history.copy_(x0)
    out.copy_(res)
    return out


def predict_x0(x, model_output, sa, s1m, clip, prediction: int, out, eps_out=None):
    cd = _compute_dtype(x.dtype)
    xf, mf = x.to(cd), model_output.to(cd)
    x0, eps = x0_eps_from(xf, mf, sa, s1m, prediction)
    if clip is not None:
        x0 = x0.clamp(clip[0], clip[1])
        eps = (xf - sa * x0) / s1m
    if eps_out is not None:
        eps_out.copy_(eps)
    out.copy_(x0)
    return out


def group_norm_act(x, num_groups, weight, bias, eps, add_bias=None, residual=None, silu=True):
    """act(group_norm(x [+ residual] + add_bias)); returns y, or (x + residual, y) with a residual.

    add_bias: (N, C) or (C,). The residual sum is rounded to x's dtype, as a separate add stores it."""
    if residual is not None:
        s = x + residual
        return s, group_norm_act(s, num_groups, weight, bias, eps, add_bias, None, silu)
    cd = _compute_dtype(x.dtype)
    h = x.to(cd)
    if add_bias is not None:
        h = h + add_bias.to(cd).reshape(*add_bias.shape, *([1] * (x.dim() - 2)))
    w = weight.to(cd) if weight is not None else None
    b = bias.to(cd) if bias is not None else None
    y = F.group_norm(h, num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def group_norm_silu(x, num_groups, weight, bias, eps, add_bias=None):
    return group_norm_act(x, num_groups, weight, bias, eps, add_bias)


def _memory_format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def add_layer_norm(x, residual, weight, bias, eps):
    """(s, layer_norm(s)) over the last dimension, s = x + residual rounded to x's dtype as a
    separate add stores it: the add and F.layer_norm in x's dtype, as a model runs them
    (PyTorch's LayerNorm keeps its statistics in fp32 for fp16 and bf16), with fp32 parameters
    cast to x's dtype."""
    s = (x + residual).contiguous()  # the fused backends' layout, whatever x's
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return s, F.layer_norm(s, (s.shape[-1],), w, b, eps)


def geglu(h):
    """a * gelu(gate) of h = [a, gate] along the last dimension, the exact (erf) GELU: the
    chunk, GELU and product in h's dtype, as diffusers' GEGLU runs them."""
    a, gate = h.chunk(2, dim=-1)
    return (a * F.gelu(gate)).contiguous()
