"""What the native extension is built from and with: sources, compiler flags, CUDA toolkit.

One recipe for both ways the kernels get built: ahead of time by setup.py (when pip's
build can see torch) and on first use by ddim_fast.ops.jit (when it could not). setup.py
loads this file by its path, before the package can be imported, so it imports nothing
but the standard library at module level; the functions that need torch are handed it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys

SOURCE_FILES = ("*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh")  # what the sources are, headers included


def source_root(package_dir: str) -> str | None:
    """The folder of the C++/CUDA sources for the ddim_fast package at `package_dir`: the
    copy installed inside it (`_csrc`, a wheel), else csrc/ beside it (a source tree or an
    editable install), else None."""
    for root in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isfile(os.path.join(root, "ops.cpp")):
            return root
    return None


def sources(root: str, cuda: bool) -> list[str]:
    """The translation units: csrc/*.cpp and csrc/cpu/*.cpp, plus csrc/cuda/*.cu with CUDA."""
    found = glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp"))
    if cuda:
        found += glob.glob(os.path.join(root, "cuda", "*.cu"))
    return sorted(found)


def sources_digest(root: str) -> str:
    """sha256 over every source and header (names and contents), for the JIT cache key."""
    h = hashlib.sha256()
    for pattern in SOURCE_FILES:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def cpu_capability() -> tuple[str, list[str]]:
    """Vector ISA for the CPU kernels: DDIM_FAST_CPU_CAPABILITY=avx512|avx2|default, else
    the best this machine has (the extension is built where it runs, like -march=native)."""
    choice = os.environ.get("DDIM_FAST_CPU_CAPABILITY", "").lower()
    if choice not in ("", "avx512", "avx2", "default"):
        raise ValueError(f"DDIM_FAST_CPU_CAPABILITY: expected 'avx512', 'avx2' or 'default', got {choice!r}")
    if not choice:
        flags = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
            choice = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            choice = "avx2"
        else:
            choice = "default"
    if choice == "avx512":
        return choice, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if choice == "avx2":
        # at::vec then uses its AVX2 Vectorized types (and the Sleef functions libtorch exports)
        return choice, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return choice, ["-DCPU_CAPABILITY=DEFAULT"]


def cxx_flags(torch) -> tuple[str, list[str], list[str]]:
    """(ISA name, compile flags, link flags) of the C++ sources; the C++ standard is what
    torch.utils.cpp_extension picks for this torch."""
    isa, isa_flags = cpu_capability()
    compile_flags, link_flags = ["-O3"] + isa_flags, []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one thread.
        # The libgomp that libtorch_cpu already loaded is the one that gets used.
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return isa, compile_flags, link_flags


def _toolkit_behind_nvcc(nvcc: str) -> str | None:
    """The CUDA toolkit folder behind `nvcc`, which may be a wrapper script.

    `nvcc --dryrun` prints the folder of the real compiler as `_HERE_=<toolkit>/bin`.
    """
    try:
        res = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (res.stdout + res.stderr).splitlines():
        if "_HERE_=" in line:
            return os.path.dirname(line.split("_HERE_=", 1)[1].strip())
    return None


def find_cuda_home() -> str | None:
    """CUDA_HOME as set, else the toolkit behind the nvcc on PATH, else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return _toolkit_behind_nvcc(nvcc) or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def decide_cuda(torch) -> tuple[bool, str, str | None]:
    """(build the CUDA kernels?, why, toolkit folder)."""
    if os.environ.get("DDIM_FAST_SKIP_CUDA", "0") == "1":
        return False, "DDIM_FAST_SKIP_CUDA=1", None
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None and not forced:
        return False, f"torch {torch.__version__} is a CPU build", None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)", None
    why = "FORCE_CUDA=1" if forced else f"torch {torch.__version__} has CUDA {torch.version.cuda}"
    return True, f"{why}; toolkit at {cuda_home}", cuda_home


def cuda_archs(default: str = "80;90") -> list[str]:
    """DDIM_FAST_CUDA_ARCHS ("80;90"), else `default`, as a list of numbers."""
    spec = os.environ.get("DDIM_FAST_CUDA_ARCHS") or default
    archs = [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.isdigit():
            raise ValueError(f"DDIM_FAST_CUDA_ARCHS: expected numbers such as '80;90', got {a!r}")
    return archs


def nvcc_flags(archs: list[str]) -> list[str]:
    """-O3, fast math, SASS for each arch and PTX for the newest (so later GPUs can JIT it).
    Naming the archs also keeps torch from guessing them, which needs a GPU."""
    flags = ["-O3", "--use_fast_math"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def pip_cuda_include_dirs() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) that the pip CUDA packages ship, which torch's
    headers include but a bare toolkit may lack."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(entry, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs
