"""The ops layer: the fused operators and how a call reaches a backend. It imports the
base layer (ddim_fast.core) and the Triton kernels (ddim_fast.kernels) only.

    ddim_step(x, eps, alpha_t, alpha_prev, sigma, noise=None, clip=None, out=None)
    guided_step(x, uncond, cond, guidance_scale, alpha_t, alpha_prev, sigma, ...)  # ddim_step on uncond + w (cond - uncond)
    predict_x0(x, eps, alpha_t, clip=None, out=None)
    group_norm_silu(x, num_groups, weight, bias, eps=1e-6)
    group_norm_act(x, num_groups, weight, bias, eps=1e-6, silu=True, residual=None)  # (s, y) with a residual
    add_layer_norm(x, residual, weight, bias, eps=1e-5)  # (x + residual, layer_norm(x + residual))
    geglu(h)  # a * gelu(gate) of h = [a, gate]

    dispatch   input checks and backend choice; `step` is the samplers' checked entry
    norms      the GroupNorm, LayerNorm and GEGLU ops, through dispatch's checks and choice
    extension  loading the native extension (ddim_fast._C, else the first-use build); `backends()`
               says what is there and which way the kernels came
    build      the extension's recipe (sources, flags, CUDA toolkit), shared with setup.py
    jit        the first-use build: compiled against the running torch, cached, under a lock
    fake       fake (meta) kernels of the native ops, for torch.compile
    fallback   the plain-PyTorch backend (and the float64 path)
"""

from .dispatch import BACKENDS, ddim_step, guided_step, predict_x0, step
from .norms import add_layer_norm, geglu, group_norm_act, group_norm_silu
from .extension import backends, has_native_kernel

__all__ = ["ddim_step", "guided_step", "predict_x0", "group_norm_silu", "group_norm_act", "add_layer_norm", "geglu", "step", "BACKENDS", "backends", "has_native_kernel"]
