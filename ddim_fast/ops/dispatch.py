"""The fused ops, with input checks and backend dispatch.

    ddim_step(x, eps, alpha_t, alpha_prev, sigma, noise=None, clip=None, out=None)
    guided_step(x, uncond, cond, guidance_scale, alpha_t, alpha_prev, sigma, ...)
    predict_x0(x, eps, alpha_t, clip=None, out=None)

The norm and activation ops (group_norm_silu, group_norm_act, add_layer_norm, geglu) are in
norms.py, through the same checks and pick_backend.

Backends (`backend=`): "cpu" and "cuda" (the native extension), "triton" (CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1), "torch" (plain PyTorch, anywhere). By default
each call takes the best one built for the tensor's device: the native op, else Triton
(CUDA), else PyTorch, warning once when a fused backend is missing. float64 tensors go
to the PyTorch backend, which computes in float64. Under torch.compile the native ops are
extern calls (fake kernels in ops/fake.py) and the Triton ones torch.library triton_ops,
which Inductor lowers to launches of the kernels in its own generated code.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..core import plan
from ..core.checks import PREDICTION_CODE, check_clip, check_prediction
from . import fallback
from .extension import backends, has_native_kernel, triton_status, warn_once

BACKENDS = ("cpu", "cuda", "triton", "torch")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --- checks -------------------------------------------------------------------------------


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16, float64), got {t.dtype}")


def check_like(op: str, name: str, x: torch.Tensor, t, allow_float32: bool = False) -> None:
    check_tensor(op, name, t)
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    if t.dtype != x.dtype and not (allow_float32 and t.dtype == torch.float32):
        extra = " (or float32)" if allow_float32 else ""
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}{extra}, got {t.dtype}")


def _check_alpha(op: str, name: str, a) -> float:
    if type(a) is float and 0.0 < a <= 1.0:  # the common case, without the ABC checks below
        return a
    if isinstance(a, torch.Tensor):
        if a.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number (or a one-element tensor), got a tensor of shape {tuple(a.shape)}")
        a = a.item()  # eager API only: the samplers pass Python floats
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number in (0, 1], got {type(a).__name__} {a!r}")
    a = float(a)
    if not (0.0 < a <= 1.0):
        raise ValueError(f"{op}: {name} must be in (0, 1], got {a}")
    return a


def pick_backend(op: str, x: torch.Tensor, backend):
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
        dev = x.device.type
        if backend in ("cpu", "cuda"):
            if backend != dev:
                raise ValueError(f"{op}: backend {backend!r} needs {backend} tensors, got x on {x.device}")
            if not has_native_kernel(op, dev):
                raise RuntimeError(f"{op}: backend {backend!r} is not available: {backends()[dev]['reason']}")
            if x.dtype == torch.float64:
                raise TypeError(f"{op}: backend {backend!r} takes float32, float16 or bfloat16; use backend='torch' for float64")
        elif backend == "triton":
            ok, why = triton_status()
            if not ok:
                raise RuntimeError(f"{op}: backend 'triton' is not available: {why}")
            if x.dtype == torch.float64:
                raise TypeError(f"{op}: backend 'triton' takes float32, float16 or bfloat16; use backend='torch' for float64")
        return backend
    if x.dtype == torch.float64:
        return "torch"
    dev = "cpu" if x.is_cpu else ("cuda" if x.is_cuda else x.device.type)  # .is_* cost a fifth of .device.type
    if dev in ("cpu", "cuda") and has_native_kernel(op, dev):
        return dev
    if dev == "cuda" and triton_status()[0]:
        return "triton"
    if dev in ("cpu", "cuda"):
        warn_once(f"native-{dev}", f"ddim_fast: the fused native {dev} ops are off ({backends()[dev]['reason']}); using the PyTorch fallback")
    return "torch"


def _is_dense(t: torch.Tensor) -> bool:
    """No gaps, no overlaps: some permutation of the dims is contiguous."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_layout(*tensors) -> bool:
    """All tensors dense and laid out like the first (one flat index addresses all)."""
    if all(t is None or t.is_contiguous() for t in tensors):  # the common case (shapes are equal)
        return True
    x = tensors[0]
    if not _is_dense(x):
        return False
    for t in tensors[1:]:
        if t is None:
            continue
        if not _is_dense(t):
            return False
        if any(s > 1 and a != b for s, a, b in zip(x.shape, x.stride(), t.stride())):
            return False
    return True


# --- ddim_step --------------------------------------------------------------------------


def ddim_step(
    x,
    eps,
    alpha_t,
    alpha_prev,
    sigma,
    noise=None,
    clip=None,
    out=None,
    *,
    prediction: str = "eps",
    use_clipped_model_output: bool = False,
    ddpm_mean: bool = False,
    x0_out=None,
    generator=None,
    backend=None,
):
    """One DDIM step from x_t to x_prev (Eq. 12 of the DDIM paper), fused in one pass.

        x0     = (x - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t)      (clamped if `clip`)
        x_prev = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev - sigma²) * eps + sigma * noise

    x, eps: (B, C, H, W) or any shape, the same dtype (fp32, fp16, bf16, fp64); `eps` is
    the model output, read as eps, x0 or v by `prediction`. alpha_t, alpha_prev in (0, 1]
    and sigma >= 0 with sigma² <= 1 - alpha_prev. noise: x's shape (fp32 or x's dtype),
    drawn with `generator` if sigma > 0 and none is given. clip: None, r (for [-r, r]) or
    (lo, hi). out: written and returned (may be x); allocated when None. x0_out: receives
    x0 when given. use_clipped_model_output: eps recomputed from the clamped x0.
    ddpm_mean: the DDPM posterior mean instead of the DDIM direction (the official
    "ddpm_noisy" update; sigma is then the DDPM sigma-hat).
    """
    op = "ddim_step"
    check_tensor(op, "x", x)
    check_like(op, "eps", x, eps)
    coefs, code, clip, noise, out = _step_args(op, x, alpha_t, alpha_prev, sigma, noise, clip, out, prediction, ddpm_mean, x0_out, generator)
    return step(x, eps, coefs, noise, clip, code, use_clipped_model_output, out, x0_out, backend=backend)


def guided_step(
    x,
    uncond,
    cond,
    guidance_scale,
    alpha_t,
    alpha_prev,
    sigma,
    noise=None,
    clip=None,
    out=None,
    *,
    prediction: str = "eps",
    use_clipped_model_output: bool = False,
    ddpm_mean: bool = False,
    x0_out=None,
    generator=None,
    backend=None,
):
    """ddim_step on the two halves of a guided model call (classifier-free guidance), in one pass:
    the model output is uncond + guidance_scale * (cond - uncond), formed in the kernel.

    uncond, cond: x's shape, dtype and layout (e.g. the two halves out.chunk(2) of the model
    call on the doubled batch). guidance_scale: a finite number. The rest as ddim_step.
    """
    op = "guided_step"
    check_tensor(op, "x", x)
    check_like(op, "uncond", x, uncond)
    check_like(op, "cond", x, cond)
    w = _check_guidance(op, guidance_scale)
    coefs, code, clip, noise, out = _step_args(op, x, alpha_t, alpha_prev, sigma, noise, clip, out, prediction, ddpm_mean, x0_out, generator)
    return step(x, uncond, coefs, noise, clip, code, use_clipped_model_output, out, x0_out, backend=backend, cond=cond, guidance=w)


def _check_guidance(op: str, w) -> float:
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
        raise ValueError(f"{op}: guidance_scale must be a finite number, got {w!r}")
    return float(w)


def _step_args(op, x, alpha_t, alpha_prev, sigma, noise, clip, out, prediction, ddpm_mean, x0_out, generator):
    """(coefs, prediction code, clip, noise, out): ddim_step's and guided_step's checked arguments."""
    a_t = _check_alpha(op, "alpha_t", alpha_t)
    a_s = _check_alpha(op, "alpha_prev", alpha_prev)
    if type(sigma) is not float and (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"{op}: sigma must be a finite number >= 0, got {sigma!r}")
    sigma = float(sigma)
    if not ddpm_mean and sigma * sigma > (1.0 - a_s) * (1 + 1e-6) + 1e-12:
        raise ValueError(f"{op}: sigma² must be <= 1 - alpha_prev = {1 - a_s:.6g}, got sigma = {sigma:.6g} (sigma² = {sigma * sigma:.6g})")
    if a_t == 1.0 and prediction != "eps":
        raise ValueError(f"{op}: alpha_t = 1 leaves no noise to predict; prediction {prediction!r} needs alpha_t < 1")
    code = PREDICTION_CODE[check_prediction(prediction)]
    clip = check_clip(clip)
    coefs = [0.0] * plan.NUM_COEFS
    coefs[plan.SQRT_ALPHA_T], coefs[plan.SQRT_ONE_MINUS_ALPHA_T], coefs[plan.SIGMA] = math.sqrt(a_t), math.sqrt(1 - a_t), sigma
    if ddpm_mean:
        beta = max(1.0 - a_t / a_s, 0.0)
        coefs[plan.C_X0] = math.sqrt(a_s) * beta / (1 - a_t)
        coefs[plan.C_XT] = math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)
    else:
        coefs[plan.C_X0] = math.sqrt(a_s)
        coefs[plan.C_EPS] = math.sqrt(max(1 - a_s - sigma * sigma, 0.0))
    coefs = tuple(coefs)
    if sigma > 0 and noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    if noise is not None:
        check_like(op, "noise", x, noise, allow_float32=True)
    if out is None:
        out = torch.empty_like(x)
    else:
        check_like(op, "out", x, out)
    if x0_out is not None:
        check_like(op, "x0_out", x, x0_out)
    return coefs, code, clip, noise, out


def step(x, model_output, coefs, noise, clip, prediction: int, clipped_eps: bool, out, x0_out=None, *, backend=None, cond=None, guidance: float = 0.0, history=None):
    """ddim_step on checked arguments with precomputed coefficients (the samplers' entry).

    coefs: one row of a step plan, NUM_COEFS floats in the order of core.plan.COEF_COLUMNS
    (sqrt_alpha_t, sqrt_one_minus_alpha_t, c_x0, c_eps, c_xt, sigma, c_x0_prev); clip: None
    or (lo, hi); prediction: 0 eps, 1 x0, 2 v. cond: with guidance, the conditional half of
    a guided call (model_output is then the unconditional half): guided_step. history:
    float32 in x's layout, a multistep solver's previous x0, read with weight c_x0_prev and
    then overwritten with this step's x0.
    """
    op = "ddim_step" if cond is None else "guided_step"
    if coefs[plan.C_X0_PREV] != 0 and history is None:
        raise ValueError(f"{op}: c_x0_prev is {coefs[plan.C_X0_PREV]} but no history (the previous step's x0) was given")
    be = pick_backend(op, x, backend)
    if be == "torch":
        return fallback.ddim_step(x, model_output, coefs, noise, clip, prediction, clipped_eps, out, x0_out, cond=cond, guidance=guidance, history=history)
    if not dense_layout(x, model_output, cond, noise, out, x0_out, history):
        # a kernel addresses all operands with one flat index: compute on dense copies
        xc = x.contiguous()
        tmp_out = torch.empty_like(xc)
        tmp_x0 = torch.empty_like(xc) if x0_out is not None else None
        tmp_history = None if history is None else history.contiguous()
        dense_cond = None if cond is None else cond.contiguous()
        step(xc, model_output.contiguous(), coefs, None if noise is None else noise.contiguous(), clip, prediction, clipped_eps, tmp_out, tmp_x0, backend=be, cond=dense_cond, guidance=guidance, history=tmp_history)
        if x0_out is not None:
            x0_out.copy_(tmp_x0)
        if history is not None and tmp_history is not history:
            history.copy_(tmp_history)
        return out.copy_(tmp_out)
    if be == "triton":
        from ..kernels import ddim_step as tk

        tk.ddim_step(x, model_output, coefs, noise, clip, prediction, clipped_eps, out, x0_out, cond=cond, guidance=guidance, history=history)
        return out
    lo, hi = clip if clip is not None else (0.0, 0.0)
    # the native ops take the row's coefficients one by one, in their schema's order (csrc/ops.cpp)
    update = [coefs[c] for c in (plan.SQRT_ALPHA_T, plan.SQRT_ONE_MINUS_ALPHA_T, plan.C_X0, plan.C_EPS, plan.C_XT, plan.SIGMA)]
    if cond is None:
        torch.ops.ddim_fast.ddim_step(x, model_output, *update, noise, clip is not None, lo, hi, prediction, clipped_eps, out, x0_out, coefs[plan.C_X0_PREV], history)
    else:
        torch.ops.ddim_fast.guided_step(x, model_output, cond, guidance, *update, noise, clip is not None, lo, hi, prediction, clipped_eps, out, x0_out, coefs[plan.C_X0_PREV], history)
    return out


# --- predict_x0 -----------------------------------------------------------------------------


def predict_x0(x, eps, alpha_t, clip=None, out=None, *, prediction: str = "eps", eps_out=None, backend=None):
    """x̂₀ = (x - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t), clamped if `clip`, in one pass.

    eps is the model output, read as eps, x0 or v by `prediction`. eps_out, when given,
    receives eps recomputed from the clamped x̂₀ (diffusers' use_clipped_model_output).
    Returns `out` (allocated when None).
    """
    op = "predict_x0"
    check_tensor(op, "x", x)
    check_like(op, "eps", x, eps)
    a_t = _check_alpha(op, "alpha_t", alpha_t)
    code = PREDICTION_CODE[check_prediction(prediction)]
    clip = check_clip(clip)
    if a_t == 1.0 and (code != 0 or eps_out is not None):
        raise ValueError(f"{op}: alpha_t = 1 leaves no noise: eps cannot be recovered from x0 there")
    if out is None:
        out = torch.empty_like(x)
    else:
        check_like(op, "out", x, out)
    if eps_out is not None:
        check_like(op, "eps_out", x, eps_out)
    sa, s1m = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    be = pick_backend(op, x, backend)
    if be == "torch":
        return fallback.predict_x0(x, eps, sa, s1m, clip, code, out, eps_out)
    if not dense_layout(x, eps, out, eps_out):
        xc = x.contiguous()
        tmp = torch.empty_like(xc)
        tmp_eps = torch.empty_like(xc) if eps_out is not None else None
        predict_x0(xc, eps.contiguous(), a_t, clip, tmp, prediction=prediction, eps_out=tmp_eps, backend=be)
        if eps_out is not None:
            eps_out.copy_(tmp_eps)
        return out.copy_(tmp)
    if be == "triton":
        from ..kernels import predict_x0 as tk

        tk.predict_x0(x, eps, sa, s1m, clip, code, out, eps_out)
        return out
    lo, hi = clip if clip is not None else (0.0, 0.0)
    torch.ops.ddim_fast.predict_x0(x, eps, sa, s1m, clip is not None, lo, hi, code, out, eps_out)
    return out
