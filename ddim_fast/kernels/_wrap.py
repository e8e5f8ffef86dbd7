"""What every Triton launcher here shares: the launch torch.compile can trace, and the
tensors passed for pointers a kernel does not touch."""

import torch
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

_placeholders: dict = {}


def traceable(kernel):
    """torch.library.wrap_triton(kernel): the launch as a graph node, so that torch.compile
    (and make_fx inside triton_op) sees it. Under Triton's interpreter (TRITON_INTERPRET=1)
    the kernel itself: torch 2.13 returns an interpreted kernel unwrapped, torch 2.11 raises
    "wrap_triton only works on functions annotated with triton.jit"."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return wrap_triton(kernel)


def placeholder(device: torch.device, dtype: torch.dtype, traced: bool = False) -> torch.Tensor:
    """A one-element tensor for a pointer whose constexpr flag is off (never read or written).

    It is never one of the launch's real tensors: a tensor passed under two pointer names is
    right only while Inductor's mutation analysis of the kernel sees which name is stored
    to, and where that analysis cannot run it assumes every pointer is written and copies
    each one back. Eager launches share one per (device, dtype), made on first use (outside
    a capture: the captured loop warms up first); a traced launch (inside a triton_op, where
    the tensors may be fake) makes its own."""
    if traced:
        return torch.empty(1, dtype=dtype, device=device)
    key = (device, dtype)
    tensor = _placeholders.get(key)
    if tensor is None:
        tensor = _placeholders.setdefault(key, torch.empty(1, dtype=dtype, device=device))
    return tensor
