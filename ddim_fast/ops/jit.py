"""The first-use build: csrc/ compiled against the running torch, once, then cached.

A plain `pip install -e .` builds in an isolated environment that has no torch, so
nothing could be compiled at install time. Then the first process that needs a native
kernel compiles the sources that ship with the package (ddim_fast/ops/build.py's recipe,
the same one setup.py uses) with torch.utils.cpp_extension and ninja, and every later
process loads the library from the cache.

The cache folder is named after a digest of everything the library depends on (torch's
version and build, Python, the compiler, the flags, every source and header), so a
cache made for another torch, or for older sources, is never loaded: it simply is not
the folder looked in. A build holds an exclusive lock (flock, released by the kernel
if the process dies); a second process that starts meanwhile waits for it and loads
its result. A library counts as built only once a `complete` marker is written beside it.

Where: $DDIM_FAST_CACHE_DIR, else $TORCH_EXTENSIONS_DIR/ddim_fast, else
~/.cache/torch_extensions/ddim_fast (torch's own default root).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from typing import NamedTuple

import torch

from . import build

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file inside the build folder still serialises
    fcntl = None

NAME = "ddim_fast_C"


class Unavailable(Exception):
    """The kernels cannot be built here; str() says why and what to do."""


class Loaded(NamedTuple):
    how: str  # "jit-cached" (a previous build) or "jit-built" (compiled by this process)
    path: str  # the library that was loaded


def cache_root() -> str:
    if os.environ.get("DDIM_FAST_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["DDIM_FAST_CACHE_DIR"]))
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.path.join(os.path.abspath(os.path.expanduser(os.environ["TORCH_EXTENSIONS_DIR"])), "ddim_fast")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions", "ddim_fast")


def say(msg: str) -> None:
    print(f"ddim_fast: {msg}", file=sys.stderr, flush=True)


def recipe(root: str) -> dict:
    """Sources and flags of a build for the running torch: what torch.utils.cpp_extension.load
    takes, plus `cuda_home` and a description."""
    isa, cflags, ldflags = build.cxx_flags(torch)
    with_cuda, why, cuda_home = build.decide_cuda(torch)
    out = {"sources": build.sources(root, cuda=with_cuda), "extra_cflags": cflags, "extra_ldflags": ldflags,
           "extra_cuda_cflags": [], "extra_include_paths": [], "with_cuda": with_cuda, "cuda_home": cuda_home}
    if with_cuda:
        default = ";".join(sorted({f"{ma}{mi}" for ma, mi in map(torch.cuda.get_device_capability, range(torch.cuda.device_count()))})) if torch.cuda.is_available() else "80;90"
        archs = build.cuda_archs(default or "80;90")
        out["extra_cflags"] = cflags + ["-DDDIM_FAST_WITH_CUDA=1"]
        out["extra_cuda_cflags"] = build.nvcc_flags(archs) + ["-DDDIM_FAST_WITH_CUDA=1"]
        out["extra_include_paths"] = build.pip_cuda_include_dirs()
        out["what"] = f"CPU ({isa}) + CUDA (sm {', '.join(archs)}) kernels"
    else:
        out["what"] = f"CPU kernels ({isa}; CUDA: {why})"
    return out


def cache_key(root: str, spec: dict, torch_version: str | None = None) -> str:
    """Digest of what the built library depends on. `torch_version` overrides the running
    torch's, so a test can show that another torch gets another folder."""
    parts = {
        "torch": torch_version or torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "compiler": os.path.realpath(shutil.which(os.environ.get("CXX", "c++")) or ""),
        "flags": [spec[k] for k in ("extra_cflags", "extra_ldflags", "extra_cuda_cflags", "extra_include_paths", "with_cuda")],
        "sources": [os.path.relpath(s, root) for s in spec["sources"]],
        "digest": build.sources_digest(root),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_dir(root: str, spec: dict) -> str:
    kind = "cuda" if spec["with_cuda"] else "cpu"
    return os.path.join(cache_root(), f"torch{torch.__version__}-{kind}-{cache_key(root, spec)[:16]}")


def _load_cached(folder: str) -> str | None:
    lib = os.path.join(folder, f"{NAME}.so")
    if not (os.path.exists(os.path.join(folder, "complete")) and os.path.exists(lib)):
        return None
    try:
        torch.ops.load_library(lib)
    except OSError as e:  # damaged or truncated: build it again
        say(f"the cached kernels in {folder} did not load ({e}); building them again")
        for name in ("complete", f"{NAME}.so"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
        return None
    return lib


def _check_tools() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise Unavailable(f"no C++ compiler ({cxx!r} is not on PATH) to build the native kernels on first use; "
                          "install one (e.g. g++), or reinstall with `pip install --no-build-isolation -e .` where one exists")
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package: its binary may be outside PATH (a venv that is not activated)

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            raise Unavailable("ninja is not installed (`pip install ninja`): torch.utils.cpp_extension needs it to build the native kernels") from None


def _lock(folder: str):
    """An exclusive lock on <folder>.lock, waited for (with a message) if another process holds it."""
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(folder + ".lock", "a")
    except OSError as e:
        raise Unavailable(f"the kernel cache {os.path.dirname(folder)} is not writable ({e.strerror}); "
                          "set DDIM_FAST_CACHE_DIR to a writable folder") from None
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another process is building the native kernels in {folder}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
    return f


def load() -> Loaded:
    """Load the cached build for this torch, or build it now. Raises Unavailable."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = build.source_root(package)
    if root is None:
        raise Unavailable(f"the C++ sources are not installed with the package (no _csrc in {package}); reinstall ddim-fast")
    spec = recipe(root)
    folder = cache_dir(root, spec)
    lib = _load_cached(folder)
    if lib is not None:
        return Loaded("jit-cached", lib)
    _check_tools()
    lock = _lock(folder)
    try:
        lib = _load_cached(folder)  # built by the process we waited for
        if lib is not None:
            return Loaded("jit-cached", lib)
        return _build(spec, folder)
    finally:
        lock.close()  # releases the flock


def _build(spec: dict, folder: str) -> Loaded:
    from torch.utils import cpp_extension

    # torch's own lock file, left behind if a build was killed; we hold the real lock.
    if os.path.exists(os.path.join(folder, "lock")):
        os.remove(os.path.join(folder, "lock"))
    if spec["with_cuda"]:
        cpp_extension.CUDA_HOME = spec["cuda_home"]  # read once at its import; ours may see a wrapped nvcc
    say(f"compiling the native {spec['what']} for torch {torch.__version__} (first use; cached in {folder}) ...")
    start = time.perf_counter()
    try:
        cpp_extension.load(
            NAME, spec["sources"], extra_cflags=spec["extra_cflags"], extra_cuda_cflags=spec["extra_cuda_cflags"],
            extra_ldflags=spec["extra_ldflags"], extra_include_paths=spec["extra_include_paths"],
            build_directory=folder, with_cuda=spec["with_cuda"], is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        log = os.path.join(folder, "build.log")
        with open(log, "w") as f:
            f.write(str(e))
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line.lower() and not line.startswith(("ninja", "Error building"))), lines[-1] if lines else type(e).__name__)
        raise Unavailable(f"the first-use build of the native kernels failed ({first}; the whole log: {log})") from None
    seconds = time.perf_counter() - start
    with open(os.path.join(folder, "complete"), "w") as f:
        json.dump({"torch": torch.__version__, "what": spec["what"], "seconds": round(seconds, 1)}, f)
    say(f"built in {seconds:.0f} s")
    return Loaded("jit-built", os.path.join(folder, f"{NAME}.so"))
