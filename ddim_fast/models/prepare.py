"""The model as a sampler runs it: ddim_fast's UNet as a LeanUNet (models/lean.py); any
other module as a copy sharing the caller's weights (cast when the sampling dtype
differs) with GroupNorm+SiLU fused, no dropout (in eval mode), channels_last conv weights
when asked and, on CUDA, SDPA attention; a diffusers UNet2DModel then takes its time
embeddings from a table (models/diffusers_lean.py) where its structure allows, and a
UNet2DConditionModel becomes a LeanConditionUNet (models/sd_lean.py) where it fits."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .diffusers_lean import TabledUNet2D, is_tableable
from .fuse import fuse_groupnorm_silu, share_copy
from .lean import LeanUNet, is_lean_convertible
from .lora import adapter_modules
from .sd_lean import LeanConditionUNet, lean_source
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


def prepare_model(model, *, device: torch.device, dtype: torch.dtype, fuse, channels_last: bool, lean: bool = True) -> tuple:
    """(the model to run on `device`, how many GroupNorm+SiLU sites were fused, why a
    UNet2DConditionModel does not run lean: a one-line note, or None).

    lean (with fuse=True): ddim_fast's UNet becomes a LeanUNet and diffusers'
    UNet2DConditionModel a LeanConditionUNet where it fits (its PEFT LoRA layers folded), in
    `dtype` and the layout asked for (copies of the weights; LeanConditionUNet.refresh takes
    new ones in place); a UNet2DModel (and a
    UNet2DConditionModel that does not fit) a TabledUNet2D where its structure allows. Otherwise fuse: True fuses a copy that shares the caller's
    weights (its dropout modules gone when in eval mode), "inplace" fuses the caller's
    module itself, False runs it as is; a module whose dtype differs from `dtype` runs as a
    cast copy; channels_last: 4-d weights get a channels_last copy. A callable that is not
    a module is returned as it is.
    """
    if not isinstance(model, torch.nn.Module):
        return model, 0, None
    if lean and fuse is True and is_lean_convertible(model):
        lean_model = LeanUNet.from_unet(model, dtype=dtype, channels_last=channels_last)
        return lean_model, lean_model.fused_sites, None
    note = None
    if lean and fuse is True and type(model).__name__ == "UNet2DConditionModel":
        source, note = lean_source(model)  # its PEFT LoRA layers folded (models/lora.py)
        if note is None:
            lean_model = LeanConditionUNet.from_unet(source, dtype=dtype, channels_last=channels_last)
            return lean_model, lean_model.fused_sites, None
    fused = 0
    mdtype = model_dtype(model)
    if mdtype is not None and mdtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    elif fuse != "inplace":
        model = share_copy(model)
    if fuse:
        fused = fuse_groupnorm_silu(model)
    if fuse is True and not model.training:  # a private copy: eval-mode dropout is a no-op call
        _drop_dropout(model)
    if channels_last:
        adapters = {id(m) for m in adapter_modules(model)}  # PEFT's LoRA factors keep their layout
        for m in model.modules():
            # a registered parameter only: a PEFT LoRA layer's `weight` is a property that reads
            # its base layer's, which modules() visits too
            w = m._parameters.get("weight")
            if id(m) not in adapters and isinstance(w, torch.nn.Parameter) and w.dim() == 4:
                m.weight = torch.nn.Parameter(w.detach().contiguous(memory_format=torch.channels_last), requires_grad=False)
    if device.type == "cuda":
        for m in model.modules():
            if isinstance(m, AttnBlock):
                m.use_sdpa = True
    if lean and fuse is True and is_tableable(model):
        model = TabledUNet2D(model)
    return model, fused, note


# FastSampler's compile= values, and the torch.compile mode of each: never one that captures
# CUDA graphs itself ("reduce-overhead"), because the sampler's graph runner captures model
# and step together.
COMPILE_MODES = {False: None, True: "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_model(model, compile):
    """The prepared model run through torch.compile (fullgraph, static shapes): a model that
    runs from a table gets its forward_rows compiled (the table itself is made once per
    plan, outside), any other module or callable is compiled whole."""
    mode = COMPILE_MODES[compile]
    if runs_from_table(model):
        model.forward_rows = torch.compile(model.forward_rows, fullgraph=True, dynamic=False, mode=mode)
        return model
    return torch.compile(model, fullgraph=True, dynamic=False, mode=mode)


def runs_from_table(model) -> bool:
    """Whether a prepared model takes its time embeddings from a table made once per plan:
    `time_table(timesteps)` before the loop, then `forward_rows(x, table[i])` at step i."""
    return isinstance(model, (LeanUNet, LeanConditionUNet, TabledUNet2D))


def _drop_dropout(model: torch.nn.Module) -> None:
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, torch.nn.Dropout) and not child.training:
                setattr(m, name, torch.nn.Identity())
