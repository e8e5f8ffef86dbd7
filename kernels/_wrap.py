"""The launch torch.compile can trace, for every torch we support."""

from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def traceable(kernel):
    """torch.library.wrap_triton(kernel): the launch as a graph node, so that torch.compile
    (and make_fx inside triton_op) sees it. Under Triton's interpreter (TRITON_INTERPRET=1)
    the kernel itself: torch 2.13 returns an interpreted kernel unwrapped, torch 2.11 raises
    "wrap_triton only works on functions annotated with triton.jit"."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return wrap_triton(kernel)
