"""The norm and activation ops, with input checks and backend dispatch (dispatch.py picks
the backend):

    group_norm_silu(x, num_groups, weight, bias, eps=1e-6)
    group_norm_act(x, num_groups, weight, bias, eps=1e-6, silu=True, residual=None)
    add_layer_norm(x, residual, weight, bias, eps=1e-5)
    geglu(h)
"""

from __future__ import annotations

import math
import numbers

import torch

from . import fallback
from .dispatch import check_like, check_tensor, pick_backend


# --- group_norm_silu, group_norm_act ---------------------------------------------------------


def group_norm_silu(x, num_groups, weight=None, bias=None, eps: float = 1e-6, *, add_bias=None, backend=None):
    """silu(group_norm(x + add_bias[..., None, None], num_groups, weight, bias, eps)) in one kernel.

    x: (N, C, *spatial), NCHW or channels_last (the output keeps x's layout); C divisible
    by num_groups; weight, bias: (C,) or None; add_bias: (N, C), (C,) (one row for every
    sample) or None: the ResNet block's time-embedding projection, added before the norm.
    Statistics in fp32 (fp64 for fp64). Not differentiable: under autograd use the module
    path (ddim_fast.models.fuse), which falls back to PyTorch when gradients are needed.
    """
    return _group_norm("group_norm_silu", x, num_groups, weight, bias, eps, add_bias, None, True, backend)


def group_norm_act(x, num_groups, weight=None, bias=None, eps: float = 1e-6, *, silu: bool = True, add_bias=None, residual=None, backend=None):
    """act(group_norm(x [+ residual] + add_bias, num_groups, weight, bias, eps)) in one kernel,
    act = SiLU (silu=True) or the identity (a plain GroupNorm, as in attention blocks).

    With a residual (x's shape, dtype and layout), the kernel first forms s = x + residual,
    rounded to x's dtype as a separate add would store it, normalises s and returns
    (s, y): one op where a UNet runs an add and then a norm, with the sum still written
    because it is the next block's skip. Without one it returns y. Arguments otherwise as
    group_norm_silu.
    """
    if not isinstance(silu, bool):
        raise TypeError(f"group_norm_act: silu must be True or False, got {type(silu).__name__} {silu!r}")
    op = "group_norm_act" if residual is None else "add_group_norm_act"
    return _group_norm(op, x, num_groups, weight, bias, eps, add_bias, residual, silu, backend)


def _group_norm(op, x, num_groups, weight, bias, eps, add_bias, residual, silu, backend):
    check_tensor(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if type(num_groups) is not int and (isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)) or num_groups <= 0:
        raise ValueError(f"{op}: num_groups must be a positive int, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"{op}: num_groups must divide the number of channels: C = {C}, num_groups = {num_groups}")
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a number > 0, got {eps!r}")
    _check_params(op, x, C, weight, bias)
    if add_bias is not None:
        check_tensor(op, "add_bias", add_bias)
        if tuple(add_bias.shape) not in ((x.shape[0], C), (C,)):
            raise ValueError(f"{op}: add_bias must have shape ({x.shape[0]}, {C}) or ({C},), got {tuple(add_bias.shape)}")
        if add_bias.device != x.device:
            raise ValueError(f"{op}: add_bias must be on x's device {x.device}, got {add_bias.device}")
    if residual is not None:
        check_like(op, "residual", x, residual)
    be = pick_backend(op, x, backend)
    if be == "torch":
        return fallback.group_norm_act(x, num_groups, weight, bias, float(eps), add_bias, residual, silu)
    # the kernels take NCHW or channels_last, and address a residual with x's strides
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    if be == "triton":
        from ..kernels import group_norm_silu as tk

        if residual is not None:
            return tk.add_group_norm_act_op(x, residual, int(num_groups), weight, bias, add_bias, float(eps), silu)
        return tk.group_norm_act_op(x, int(num_groups), weight, bias, add_bias, float(eps), silu)
    if residual is not None:
        return torch.ops.ddim_fast.add_group_norm_act(x, residual, int(num_groups), weight, bias, add_bias, float(eps), silu)
    if op == "group_norm_silu":
        return torch.ops.ddim_fast.group_norm_silu(x, int(num_groups), weight, bias, add_bias, float(eps))
    return torch.ops.ddim_fast.group_norm_act(x, int(num_groups), weight, bias, add_bias, float(eps), silu)


def _check_params(op: str, x, width: int, weight, bias) -> None:
    """A norm's weight and bias: each a floating-point (width,) tensor on x's device, or None."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(op, name, p)
        if tuple(p.shape) != (width,):
            raise ValueError(f"{op}: {name} must have shape ({width},), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {p.device}")


# --- add_layer_norm, geglu ---------------------------------------------------------------------


def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5, *, backend=None):
    """(s, layer_norm(s, weight, bias, eps)) of s = x + residual, over the last dimension, in
    one kernel: a transformer layer's residual add and the LayerNorm after it.

    x, residual: one shape, dtype and device (any shape, the last dimension normalised). s is
    rounded to x's dtype, as a separate add stores it, and the norm takes the stored sum, so
    both outputs are what an add and then F.layer_norm give (statistics in fp32, fp64 for
    fp64). weight, bias: (D,), in x's dtype or float32, or None (1 and 0). Returns (s, y),
    contiguous (non-contiguous inputs are copied first).
    """
    op = "add_layer_norm"
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (the one normalised), got a scalar")
    check_like(op, "residual", x, residual)
    _check_params(op, x, x.shape[-1], weight, bias)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype} or float32, got {p.dtype}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{op}: weight and bias must have one dtype, got {weight.dtype} and {bias.dtype}")
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    be = pick_backend(op, x, backend)
    if be == "torch":
        return fallback.add_layer_norm(x, residual, weight, bias, float(eps))
    # the kernels address rows of contiguous tensors
    x, residual = x.contiguous(), residual.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if be == "triton":
        from ..kernels import layer_norm as tk

        return tk.add_layer_norm_op(x, residual, weight, bias, float(eps))
    return torch.ops.ddim_fast.add_layer_norm(x, residual, weight, bias, float(eps))


def geglu(h, *, backend=None):
    """a * gelu(gate) of h = [a, gate] along the last dimension, in one kernel: GEGLU's
    activation after its projection (diffusers' GEGLU; the exact, erf GELU).

    h: (..., 2F); returns (..., F) in h's dtype, contiguous (a non-contiguous h is copied
    first), computed in fp32 (fp64 for fp64) and rounded once.
    """
    op = "geglu"
    check_tensor(op, "h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"{op}: h's last dimension holds [a, gate] and must be even, got shape {tuple(h.shape)}")
    be = pick_backend(op, h, backend)
    if be == "torch":
        return fallback.geglu(h)
    h = h.contiguous()
    if be == "triton":
        from ..kernels import geglu as tk

        return tk.geglu_op(h)
    return torch.ops.ddim_fast.geglu(h)
