"""What one sampling step dispatches: aten (and ddim_fast) ops per step, counted on any device.

    from ddim_fast.apps.opcount import ops_per_step
    per_step, not_channels_last = ops_per_step(lambda S: FastSampler(model, schedule, steps=S), x_T)

A TorchDispatchMode sees every op that reaches a kernel (views excepted: they launch
nothing); on a GPU each one is a kernel launch or more, so at small batch the count is the
step's time. Two sample() calls with different S, differenced over S, drop what runs once
per sample (the cast of x_T, tables, the result). Work moved into an opaque op still counts
as that op.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COPIES = frozenset({"aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"})


class OpCounter(TorchDispatchMode):
    """Non-view ops by name, and the ops that take or make a 4-d image tensor that is not
    channels_last (attention's (batch, heads, tokens, channels) operands are not images)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.not_channels_last = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            name = func.name()
            self.ops[name] += 1
            if "scaled_dot_product" not in name:
                leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
                if any(isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last) for t in leaves):
                    self.not_channels_last[name] += 1
        return out


def ops_per_step(sampler_for_steps: Callable[[int], object], x_T: torch.Tensor, steps: Sequence[int] = (2, 5), **sample_kwargs) -> tuple:
    """({op: count per step}, {op: uses of non-channels_last 4-d tensors per step}).

    sampler_for_steps(S) makes a sampler of S steps; each is warmed up by one sample(x_T)
    before the counted one, so that set-up done once (model preparation) is not counted.
    sample_kwargs go to sample() (model_kwargs, guidance_scale, ...).
    """
    counts = []
    for s in steps:
        sampler = sampler_for_steps(s)
        sampler.sample(x_T, **sample_kwargs)
        with OpCounter() as c:
            sampler.sample(x_T, **sample_kwargs)
        counts.append(c)
    a, b = counts
    span = steps[1] - steps[0]

    def per(ca, cb):
        return {k: (cb[k] - ca[k]) / span for k in set(ca) | set(cb) if cb[k] != ca[k]}

    return per(a.ops, b.ops), per(a.not_channels_last, b.not_channels_last)


__all__ = ["OpCounter", "ops_per_step", "COPIES"]
