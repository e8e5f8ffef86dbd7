"""The model as a sampler runs it: a copy sharing the caller's weights (cast when the
sampling dtype differs), GroupNorm+SiLU fused, channels_last conv weights when asked and,
on CUDA, SDPA attention."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .fuse import fuse_groupnorm_silu, share_copy
from .unet import AttnBlock


def model_device(model) -> Optional[torch.device]:
    """The device of the first parameter (or buffer) of a module; None for other callables."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def model_dtype(model) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of a module; None for other callables."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def prepare_model(model, *, device: torch.device, dtype: torch.dtype, fuse, channels_last: bool) -> tuple:
    """(the model to run on `device`, how many GroupNorm+SiLU sites were fused).

    fuse: True fuses a copy that shares the caller's weights, "inplace" fuses the
    caller's module itself, False runs it as is. A module whose dtype differs from
    `dtype` runs as a cast copy. channels_last: 4-d weights get a channels_last copy.
    A callable that is not a module is returned as it is.
    """
    if not isinstance(model, torch.nn.Module):
        return model, 0
    fused = 0
    mdtype = model_dtype(model)
    if mdtype is not None and mdtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    elif fuse != "inplace":
        model = share_copy(model)
    if fuse:
        fused = fuse_groupnorm_silu(model)
    if channels_last:
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() == 4:
                m.weight = torch.nn.Parameter(w.detach().contiguous(memory_format=torch.channels_last), requires_grad=False)
    if device.type == "cuda":
        for m in model.modules():
            if isinstance(m, AttnBlock):
                m.use_sdpa = True
    return model, fused
