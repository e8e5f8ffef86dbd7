"""A UNet with PEFT LoRA layers as the plain UNet its forward computes: `merged_view(unet)`.

diffusers adds LoRA adapters (load_lora_weights, add_adapter) by wrapping layers in PEFT's
tuner layers (peft/tuners/lora/layer.py): a lora.Linear or lora.Conv2d holds the original
layer as `base_layer` and, per adapter a, low-rank factors A_a (r, in) and B_a (out, r) and a
scale s_a (lora_alpha / r times the adapter's weight in set_adapters). Its forward, in eval
mode (lora_dropout off), is the base layer with the effective weight

    W_eff = W − Σ_{a merged} s_a B_a A_a   adapters disabled (forward unmerges the merged ones)
    W_eff = W                              some adapter merged (fuse_lora wrote it into W)
    W_eff = W + Σ_{a active} s_a B_a A_a   otherwise

(B_a A_a as the 1x1 product, or for a k x k convolution A_a convolved with B_a: PEFT's
get_delta_weight), and the base layer's bias. The view replaces each tuner layer by a plain
nn.Linear / nn.Conv2d with W_eff, so the lean rewrite (models/sd_lean.py) takes LoRA as it
takes any UNet: folded once, no extra GEMM per step.

A layer whose forward is not such a W_eff (a LoRA variant such as DoRA, lora_bias, a tuner
that is not LoRA, an embedding LoRA, a grouped, dilated or non-zero-padded convolution) is
not folded: the view is then the UNet itself with a one-line note naming the layer, and the
caller runs the UNet as it is.
"""

from __future__ import annotations

import copy
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def merged_view(unet: nn.Module) -> tuple:
    """(a module that computes what `unet` computes with its LoRA layers folded, None), or
    (unet, why a layer cannot be folded, in one line).

    Without PEFT tuner layers the module is `unet` itself. Otherwise it is a structural copy:
    each module on the path from the root to a tuner layer is a shallow copy (its own dicts of
    children, parameters and buffers; its hooks are unet's), and each tuner layer its base
    nn.Linear / nn.Conv2d: a shallow copy with the base's hyper-parameters, bias (shared) and
    W_eff (new: computed in float32, float64 for a float64 layer, stored in the base weight's
    dtype), or the base layer itself where no adapter adds to it. Every other module and
    tensor is unet's own. `unet` is not changed (no merge, no unmerge).
    """
    layers = _tuner_layers(unet)
    if not layers:
        return unet, None
    plain_layers = {}
    for name, layer in layers.items():
        reason = _fold_refusal(layer)
        if reason is not None:
            return unet, f"its PEFT layer {name} cannot be folded into a plain layer: {reason}"
        adapters, _ = _folded_adapters(layer)
        if adapters:
            plain_layers[name] = _plain_layer(layer.base_layer, effective_weight(layer))
        else:  # W_eff is the base weight: the base layer is the plain layer
            plain_layers[name] = layer.base_layer
    return _with_replaced(unet, plain_layers), None


def _tuner_layers(unet: nn.Module) -> dict:
    """{name: PEFT tuner layer} of the outermost tuner layers in `unet` (a tuner layer nested
    in another is its base layer's business)."""
    # PEFT not imported: no module of it can exist (and it is not imported here)
    if "peft" not in sys.modules or not isinstance(unet, nn.Module):
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {}

    def visit(module, name):
        if isinstance(module, BaseTunerLayer):
            layers[name] = module
            return
        for key, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{key}" if name else key)

    visit(unet, "")
    return layers


def adapter_modules(model: nn.Module) -> list:
    """The modules inside model's PEFT tuner layers but for their base layers: the adapters'
    own (lora_A, lora_B, lora_dropout, DoRA's magnitude), which PEFT's code reads as it made
    them (DoRA views a convolution's factors as matrices: no channels_last copy of these)."""
    if "peft" not in sys.modules or not isinstance(model, nn.Module):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for child_name, child in layer.named_children():
            if child_name != "base_layer":
                found.extend(child.modules())
    return found


def _folded_adapters(layer) -> tuple:
    """(the adapters whose B A the forward adds to the base weight, their sign): see W_eff."""
    if layer.disable_adapters:
        return [a for a in layer.merged_adapters if a in layer.lora_A], -1.0
    if layer.merged:
        return [], 1.0
    return [a for a in layer.active_adapters if a in layer.lora_A], 1.0


def _fold_refusal(layer) -> Optional[str]:
    """Why the layer's forward is not base_layer with a folded weight (None when it is)."""
    from peft.tuners.lora import layer as lora
    from peft.tuners.tuners_utils import BaseTunerLayer

    kind = type(layer)
    if kind not in (lora.Linear, lora.Conv2d):
        return f"a {kind.__module__}.{kind.__qualname__} tuner layer (only LoRA's Linear and Conv2d fold)"
    base = layer.base_layer
    if isinstance(base, BaseTunerLayer) or type(base) not in (nn.Linear, nn.Conv2d):
        return f"its base layer is a {type(base).__qualname__}, not an nn.Linear or nn.Conv2d"
    if type(base) is nn.Conv2d:
        # lora_A takes the base's kernel, stride and padding but not these: its forward is
        # then not one convolution with W_eff
        if base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros":
            return f"a convolution with groups={base.groups}, dilation={base.dilation}, padding_mode={base.padding_mode!r}"
    adapters, _ = _folded_adapters(layer)
    for adapter in adapters:
        variant = layer.lora_variant.get(adapter)
        if variant is not None or layer.use_dora.get(adapter, False):
            name = type(variant).__name__ if variant is not None else "DoRA"
            return f"adapter {adapter!r} is a LoRA variant ({name}), not W + s B A"
        if layer.lora_bias.get(adapter, False):
            return f"adapter {adapter!r} has its own bias (lora_bias=True)"
    return None


def effective_weight(layer) -> torch.Tensor:
    """W_eff of a foldable LoRA Linear or Conv2d layer (module docstring), in the base weight's
    dtype, on its device; computed in float32 (float64 for a float64 weight)."""
    base_weight = layer.base_layer.weight.detach()
    dtype = torch.float64 if base_weight.dtype == torch.float64 else torch.float32
    adapters, sign = _folded_adapters(layer)
    if not adapters:
        return base_weight
    weight = base_weight.to(dtype=dtype, copy=True)
    for adapter in adapters:
        weight.add_(_delta_weight(layer, adapter, dtype).to(weight.device), alpha=sign)
    return weight.to(base_weight.dtype)


def _delta_weight(layer, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """s_a B_a A_a in `dtype`: PEFT's get_delta_weight (peft/tuners/lora/layer.py), computed in
    `dtype` instead of the adapter's own (fp16 or bf16 on a GPU)."""
    a = layer.lora_A[adapter].weight.detach().to(dtype)
    b = layer.lora_B[adapter].weight.detach().to(dtype)
    scaling = layer.scaling[adapter]
    if a.dim() == 2:  # Linear: (out, r) @ (r, in); fan_in_fan_out stores W transposed
        delta = b @ a
        return (delta.T if layer.fan_in_fan_out else delta) * scaling
    if layer.base_layer.weight.shape[2:4] == (1, 1):  # a 1x1 convolution: the same product
        return (b[:, :, 0, 0] @ a[:, :, 0, 0])[:, :, None, None] * scaling
    # k x k: A (r, in, k, k) then B (out, r, 1, 1) is one convolution with B's 1x1 taps applied
    # to A's: conv2d(A^T, B)^T (out, in, k, k)
    return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling


def _plain_layer(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The nn.Linear or nn.Conv2d `base` with `weight`: a shallow copy (its type, hyper-parameters
    and bias) with its own dict of parameters (no initialisation of a new layer's weights)."""
    plain = copy.copy(base)
    plain._parameters = dict(base._parameters)
    plain._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    return plain


def _with_replaced(root: nn.Module, replacements: dict) -> nn.Module:
    """root with the modules at the dotted names of `replacements` replaced by their values:
    the modules on the way down are shallow copies, all others root's own."""
    on_the_way = {""}
    for name in replacements:
        parts = name.split(".")
        on_the_way.update(".".join(parts[:i]) for i in range(len(parts)))

    def rebuilt(module, name):
        if name in replacements:
            return replacements[name]
        if module is None or name not in on_the_way:
            return module
        shell = copy.copy(module)  # the same attributes (config, flags, processors)
        shell._parameters = dict(module._parameters)
        shell._buffers = dict(module._buffers)
        shell._modules = {key: rebuilt(child, f"{name}.{key}" if name else key) for key, child in module._modules.items()}
        return shell

    return rebuilt(root, "")


__all__ = ["merged_view", "effective_weight", "adapter_modules"]
