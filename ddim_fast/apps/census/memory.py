"""The most tensor memory a piece of code holds at once beyond what it was given: `StoragePeak`.

A TorchDispatchMode sees every op output; an output whose storage is none of the op's inputs'
is new memory, counted from then until the storage is freed (a weakref finalizer on the
storage, whose Python object lives as long as the storage does). It counts tensors on any
device, CPU included, where torch keeps no allocator statistics; memory taken outside torch's
dispatch (NumPy, a custom allocator) is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StoragePeak(TorchDispatchMode):
    """`with StoragePeak() as counter: ...`, then counter.peak: the most bytes of storage made
    inside the block that were alive at one time; counter.live: those alive now."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in known or storage.nbytes() == 0:
                continue
            known.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, storage.nbytes())
        return out


__all__ = ["StoragePeak"]
