"""The fusion pass: GroupNorm -> SiLU pairs become one fused kernel (ops.group_norm_silu).

The pass knows no model family. A family registers the rewrites of its blocks with
`register_rule(applies, rewrite)`, so a new family is one new file:
- ddim_fast's UNet (models/unet_rules.py): the ResnetBlock's norm1 -> act1 and
  norm2(h + temb_proj(...)) -> act2 (the bias add joins the fused kernel too), and the
  output head norm_out -> act_out;
- diffusers' ResnetBlock2D and UNet2DModel's output head (models/diffusers_compat.py).
The pass itself fuses any nn.Sequential holding a GroupNorm directly followed by a SiLU.

The rewrite is reversible (`unfuse`) and keeps state-dict keys: a fused module holds the
GroupNorm's own Parameter objects. `fused_copy(model)` fuses a copy that shares the
weights, leaving the caller's module as it was.
"""

from __future__ import annotations

import copy
import types
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import ops
from ..ops import has_native_kernel

_SAVED = "_ddim_fast_unfused"  # on a parent module: {child name: original module}


class FusedGroupNormSiLU(nn.GroupNorm):
    """silu(group_norm(x + add_bias)) in one kernel; the same parameters as nn.GroupNorm.

    Under autograd (grad mode on and x or the weights requiring grad) it computes the
    same function with differentiable PyTorch ops, so a fused model still trains.
    """

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> "FusedGroupNormSiLU":
        fused = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, device="meta")
        if gn.affine:
            fused.weight, fused.bias = gn.weight, gn.bias  # share, do not copy
        fused.train(gn.training)
        return fused

    def forward(self, x: torch.Tensor, add_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (self.weight is not None and self.weight.requires_grad) or (add_bias is not None and add_bias.requires_grad))
        if needs_grad:
            if add_bias is not None:
                x = x + add_bias.reshape(*add_bias.shape, *([1] * (x.dim() - 2)))
            return torch.nn.functional.silu(torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
        if add_bias is not None and add_bias.dtype != x.dtype:
            add_bias = add_bias.to(x.dtype)
        if _native_ok(x):  # straight to the operator: it checks its arguments in C++
            return torch.ops.ddim_fast.group_norm_silu(x, self.num_groups, self.weight, self.bias, add_bias, self.eps)
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, add_bias=add_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused with SiLU"


def _native_ok(x: torch.Tensor) -> bool:
    """Whether x can go straight to the native op (has_native_kernel caches the answer)."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or x.dtype == torch.float64 or not has_native_kernel("group_norm_silu", dev):
        return False
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    """parent.<name> = new, remembering the original for `unfuse`."""
    saved = parent.__dict__.setdefault(_SAVED, {})
    saved.setdefault(name, getattr(parent, name))
    setattr(parent, name, new)


def replace_forward(module: nn.Module, forward) -> None:
    """Give `module` its own forward(self, ...) (a fused rewrite of its class's), undone by `unfuse`."""
    module.__dict__.setdefault(_SAVED, {})["forward"] = None
    module.forward = types.MethodType(forward, module)


def fuse_pair(parent: nn.Module, norm_name: str, act_name: str, norm_types=(nn.GroupNorm,)) -> bool:
    """parent.<norm_name> (exactly one of `norm_types`) then parent.<act_name> (a SiLU)
    become one FusedGroupNormSiLU and an Identity. False when they are not such a pair
    (fused already included: a FusedGroupNormSiLU is not one of norm_types)."""
    norm, act = getattr(parent, norm_name, None), getattr(parent, act_name, None)
    if type(norm) not in norm_types or not isinstance(act, nn.SiLU):
        return False
    replace(parent, norm_name, FusedGroupNormSiLU.from_group_norm(norm))
    replace(parent, act_name, nn.Identity())
    return True


_RULES: list = []  # (applies(module) -> bool, rewrite(module) -> sites fused), in registration order


def register_rule(applies, rewrite: Callable[[nn.Module], int]) -> None:
    """Teach the pass a family's block: `applies` is a module class or a predicate
    module -> bool; `rewrite(module)` fuses that block in place and returns how many
    sites it fused (0 when it leaves it as it is)."""
    test = (lambda m: isinstance(m, applies)) if isinstance(applies, type) else applies
    _RULES.append((test, rewrite))


def fuse_groupnorm_silu(module: nn.Module) -> int:
    """Rewrite GroupNorm -> SiLU sites of `module` in place; returns how many were fused.

    Each submodule gets the first registered rule that applies to it, else the
    nn.Sequential rule. Idempotent: fused sites are not fused again.
    """
    n = 0
    for m in list(module.modules()):
        for applies, rewrite in _RULES:
            if applies(m):
                n += rewrite(m)
                break
        else:
            if isinstance(m, nn.Sequential):
                n += _fuse_sequential(m)
    return n


def _fuse_sequential(seq: nn.Sequential) -> int:
    n = 0
    names = list(seq._modules.keys())
    for a, b in zip(names, names[1:]):
        n += fuse_pair(seq, a, b)
    return n


def unfuse(module: nn.Module) -> int:
    """Undo fuse_groupnorm_silu on `module`; returns how many modules were restored."""
    n = 0
    for m in list(module.modules()):
        saved = m.__dict__.pop(_SAVED, None)
        if saved:
            for name, orig in saved.items():
                if name == "forward":
                    m.__dict__.pop("forward", None)
                else:
                    setattr(m, name, orig)
                n += 1
    return n


def share_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares `model`'s parameters and buffers (no weight copy)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def fused_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A fused copy of `model` that shares its weights; returns (copy, sites fused)."""
    clone = share_copy(model)
    return clone, fuse_groupnorm_silu(clone)


def count_fusable(module: nn.Module) -> int:
    """How many sites fuse_groupnorm_silu would fuse (on a throwaway copy)."""
    return fused_copy(module)[1]


__all__ = ["FusedGroupNormSiLU", "fuse_groupnorm_silu", "register_rule", "fuse_pair", "replace", "replace_forward", "unfuse", "share_copy", "fused_copy", "count_fusable"]
