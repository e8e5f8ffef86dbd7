"""Which backends are available, and why not when one is missing.

The native extension registers the operators torch.ops.ddim_fast.* when it loads. It is
ddim_fast._C when setup.py could compile it (ahead of time), else the library that
ddim_fast.ops.jit compiles on first use and caches. If neither can be had, the package
still imports and works on the PyTorch fallback, and warns once, on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import threading
import warnings

import torch

from . import fake

_OPS = ("ddim_step", "guided_step", "predict_x0", "group_norm_silu", "group_norm_act", "add_group_norm_act", "add_layer_norm", "geglu")


_loaded = None  # (loaded, reason), once per process
_build = {"how": "absent", "path": None}  # which way the kernels came: backends() reports it
_load_lock = threading.Lock()


def _aot_library():
    """(path of the ahead-of-time build ddim_fast._C or None, why it must not be loaded or None).

    setup.py writes _C.build.json beside the library, naming the torch it was compiled
    against; a library for another torch is not loaded (that can crash, not only fail)."""
    spec = importlib.util.find_spec("ddim_fast._C")
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if spec is None or spec.origin is None or os.path.dirname(os.path.abspath(spec.origin)) != package:
        return None, None  # none, or one of another copy of the package (an import finder's fall-through)
    return spec.origin, stale_reason(os.path.join(os.path.dirname(spec.origin), "_C.build.json"), torch.__version__)


def stale_reason(info_path: str, torch_version: str) -> str | None:
    """Why the library that `info_path` describes is not for `torch_version`, or None if it is
    (or if nothing says otherwise: a build older than the record)."""
    try:
        with open(info_path) as f:
            built_for = json.load(f).get("torch")
    except (OSError, ValueError):
        return None
    if built_for and built_for != torch_version:
        return f"ddim_fast._C was built against torch {built_for}, and this is torch {torch_version}"
    return None


def _load_extension():
    """(loaded, reason). The ahead-of-time build if there is one for this torch, else the
    first-use build (ddim_fast.ops.jit). DDIM_FAST_DISABLE_EXTENSION=1 loads neither (for
    tests and debugging); DDIM_FAST_JIT=1 skips the ahead-of-time build."""
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def _load():
    if os.environ.get("DDIM_FAST_DISABLE_EXTENSION", "0") == "1":
        return False, "disabled by DDIM_FAST_DISABLE_EXTENSION=1"
    aot, stale = (None, None) if os.environ.get("DDIM_FAST_JIT", "0") == "1" else _aot_library()
    failed = None
    if aot is not None and stale is None:
        try:
            importlib.import_module("ddim_fast._C")
        except ImportError as e:  # an ABI mismatch that the record did not catch
            failed = f"ddim_fast._C failed to load ({e})"
        else:
            _build.update(how="ahead-of-time", path=aot)
            fake.register()
            return True, "loaded"
    from . import jit

    if stale or failed:
        jit.say(f"{stale or failed}: compiling the kernels for this torch instead")
    try:
        got = jit.load()
    except jit.Unavailable as e:
        if stale or failed:
            return False, f"{stale or failed}; {e}; or reinstall with `pip install --no-build-isolation -e .` here"
        return False, str(e)
    _build.update(how=got.how, path=got.path)
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
    "available" (bool) and "reason" (str). "cpu" and "cuda" also say which way the native
    kernels came, as "build": "ahead-of-time" (setup.py), "jit-cached" (a first-use build
    of an earlier process), "jit-built" (compiled by this process) or "absent" (the reason
    says why), and "path", the library loaded (or None).
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
    for dev in ("cpu", "cuda"):
        out[dev].update(build=_build["how"], path=_build["path"])
    ok, why = triton_status()
    out["triton"] = {"available": ok, "reason": why}
    out["torch"] = {"available": True, "reason": f"torch {torch.__version__}"}
    return out
