"""The fusion pass: GroupNorm -> SiLU pairs become one fused kernel (ops.group_norm_silu).

Sites it knows:
- ddim_fast.UNet's ResnetBlock: norm1 -> act1, and norm2(h + temb_proj(...)) -> act2 (the
  bias add joins the fused kernel too); the output head norm_out -> act_out;
- any nn.Sequential holding a GroupNorm directly followed by a SiLU;
- diffusers' ResnetBlock2D and UNet2DModel's output head (ddim_fast.diffusers_compat).

The rewrite is reversible (`unfuse`) and keeps state-dict keys: a fused module holds the
GroupNorm's own Parameter objects. `fused_copy(model)` fuses a copy that shares the
weights, leaving the caller's module as it was.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from . import ops
from ._ext import has_native_kernel

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


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    saved = parent.__dict__.setdefault(_SAVED, {})
    saved.setdefault(name, getattr(parent, name))
    setattr(parent, name, new)


def _fuse_pair(parent: nn.Module, norm_name: str, act_name: str) -> bool:
    norm, act = getattr(parent, norm_name, None), getattr(parent, act_name, None)
    if type(norm) not in (nn.GroupNorm, _unet_group_norm()) or not isinstance(act, nn.SiLU):
        return False
    _replace(parent, norm_name, FusedGroupNormSiLU.from_group_norm(norm))
    _replace(parent, act_name, nn.Identity())
    return True


def _unet_group_norm():
    from .unet import GroupNorm

    return GroupNorm


def fuse_groupnorm_silu(module: nn.Module) -> int:
    """Rewrite GroupNorm -> SiLU sites of `module` in place; returns how many were fused.

    Idempotent: fused sites are not fused again.
    """
    from .unet import ResnetBlock, UNet

    n = 0
    for m in list(module.modules()):
        if isinstance(m, ResnetBlock):
            n += _fuse_pair(m, "norm1", "act1")
            n += _fuse_pair(m, "norm2", "act2")  # norm2 takes the temb bias: fused too
        elif isinstance(m, UNet):
            n += _fuse_pair(m, "norm_out", "act_out")
        elif isinstance(m, nn.Sequential):
            n += _fuse_sequential(m)
        else:
            n += _fuse_foreign(m)
    return n


def _fuse_sequential(seq: nn.Sequential) -> int:
    n = 0
    names = list(seq._modules.keys())
    for a, b in zip(names, names[1:]):
        n += _fuse_pair(seq, a, b)
    return n


def _fuse_foreign(m: nn.Module) -> int:
    """Blocks of other libraries (diffusers), if that library is loaded."""
    try:
        from .diffusers_compat import fuse_diffusers_module
    except ImportError:
        return 0
    return fuse_diffusers_module(m)


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


__all__ = ["FusedGroupNormSiLU", "fuse_groupnorm_silu", "unfuse", "share_copy", "fused_copy", "count_fusable"]
