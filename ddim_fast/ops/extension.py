"""Which backends are available, and why not when one is missing.

The native extension ddim_fast._C registers the operators torch.ops.ddim_fast.* when it
loads. If it did not build, or was built against another torch, the package still
imports and works on the PyTorch fallback, and warns once, on first use.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from . import fake

_OPS = ("ddim_step", "predict_x0", "group_norm_silu", "group_norm_act", "add_group_norm_act")


@functools.lru_cache(maxsize=None)
def _load_extension():
    """(loaded, reason). Honours DDIM_FAST_DISABLE_EXTENSION=1 (for tests and debugging)."""
    if os.environ.get("DDIM_FAST_DISABLE_EXTENSION", "0") == "1":
        return False, "disabled by DDIM_FAST_DISABLE_EXTENSION=1"
    try:
        importlib.import_module("ddim_fast._C")
    except ImportError as e:  # not built, or an ABI mismatch with this torch
        return False, f"ddim_fast._C failed to load ({e}); reinstall with `pip install --no-build-isolation -e .`"
    fake.register()
    return True, "loaded"


_native = {}  # (op, device type) -> bool: the dispatcher query costs microseconds, ask it once


@torch.compiler.assume_constant_result  # fixed per process: torch.compile may fold it
def has_native_kernel(op: str, device_type: str) -> bool:
    """Whether ddim_fast::<op> has a kernel for "cpu" or "cuda" in the loaded extension."""
    found = _native.get((op, device_type))
    if found is None:
        key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
        found = _load_extension()[0] and torch._C._dispatch_has_kernel_for_dispatch_key(f"ddim_fast::{op}", key)
        _native[(op, device_type)] = found
    return found


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def triton_status():
    """(available, reason) for the Triton kernels."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, f"triton {triton.__version__} (interpreter: TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} is installed but there is no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
    return True, f"triton {triton.__version__}"


_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def backends() -> dict:
    """What each backend can run here, and why not when it cannot.

    Returns {"cpu": {...}, "cuda": {...}, "triton": {...}, "torch": {...}}, each with
    "available" (bool) and "reason" (str).
    """
    loaded, why = _load_extension()
    out = {}
    for dev in ("cpu", "cuda"):
        if not loaded:
            out[dev] = {"available": False, "reason": why}
            continue
        have = [op for op in _OPS if has_native_kernel(op, dev)]
        if dev == "cuda" and have and not torch.cuda.is_available():
            out[dev] = {"available": False, "reason": "CUDA kernels are built but no CUDA device is visible"}
        elif have:
            out[dev] = {"available": True, "reason": f"native kernels: {', '.join(have)}"}
        else:
            reason = "the extension was built without CUDA kernels (CPU-only torch or no nvcc at build time)" if dev == "cuda" else "no CPU kernels registered"
            out[dev] = {"available": False, "reason": reason}
    ok, why = triton_status()
    out["triton"] = {"available": ok, "reason": why}
    out["torch"] = {"available": True, "reason": f"torch {torch.__version__}"}
    return out
