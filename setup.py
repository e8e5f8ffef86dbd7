"""Build ddim_fast and its native extension ddim_fast._C.

What gets built is decided here, in plain sight, and printed:

- the C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built;
- the CUDA kernels (csrc/cuda/*.cu) are built when torch is a CUDA build and nvcc is
  found, or when FORCE_CUDA=1; DDIM_FAST_SKIP_CUDA=1 skips them;
- DDIM_FAST_CUDA_ARCHS="80;90" picks the GPU architectures (default: 80 and 90, plus
  PTX for the newest so that later GPUs can JIT it).

A missing nvcc warns and builds the CPU part; it never fails the install. The extension
is compiled against the torch found in this environment, so install with
`pip install --no-build-isolation -e .` (build isolation would compile against another
torch than the one that imports it).
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[ddim-fast setup] {msg}", file=sys.stderr)


def _toolkit_behind_nvcc(nvcc):
    """The CUDA toolkit folder behind `nvcc`, which may be a wrapper script.

    `nvcc --dryrun` prints the folder of the real compiler as `_HERE_=<toolkit>/bin`.
    """
    try:
        res = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (res.stdout + res.stderr).splitlines():
        if "_HERE_=" in line:
            here = line.split("_HERE_=", 1)[1].strip()
            return os.path.dirname(here)
    return None


def _find_cuda_home():
    """CUDA_HOME as set, else the toolkit behind the nvcc on PATH, else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return _toolkit_behind_nvcc(nvcc) or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _decide_cuda():
    """(build_cuda, reason). Must run before torch.utils.cpp_extension is imported,
    because that module reads CUDA_HOME once, at import."""
    import torch

    if os.environ.get("DDIM_FAST_SKIP_CUDA", "0") == "1":
        return False, "DDIM_FAST_SKIP_CUDA=1"
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None and not forced:
        return False, f"torch {torch.__version__} is a CPU build"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _log("WARNING: nvcc not found (set CUDA_HOME or put nvcc on PATH); building the CPU kernels only")
        return False, "nvcc not found"
    os.environ["CUDA_HOME"] = cuda_home
    why = "FORCE_CUDA=1" if forced else f"torch {torch.__version__} has CUDA {torch.version.cuda}"
    return True, f"{why}; toolkit at {cuda_home}"


def _cuda_arch_flags():
    archs = [a.strip() for a in os.environ.get("DDIM_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.isdigit():
            raise ValueError(f"DDIM_FAST_CUDA_ARCHS: expected numbers such as '80;90', got {a!r}")
    # torch's own arch detection needs a GPU; name the list so it does not guess.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return archs, flags


def _pip_cuda_include_dirs():
    """Headers (cuBLAS, cuSPARSE, ...) that the pip CUDA packages ship, which torch's
    headers include but a bare toolkit may lack."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(entry, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _cpu_capability():
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


def _extensions():
    build_cuda, reason = _decide_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cpu_isa, isa_flags = _cpu_capability()
    cxx_flags = ["-O3"] + isa_flags  # the C++ standard: what torch.utils.cpp_extension picks for this torch
    link_flags = []
    import torch

    if torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one thread.
        # The libgomp that libtorch_cpu already loaded is the one that gets used.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    _log(f"CPU kernels use the {cpu_isa} vector ISA (DDIM_FAST_CPU_CAPABILITY=avx512|avx2|default to choose)")
    if build_cuda:
        archs, arch_flags = _cuda_arch_flags()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs = _pip_cuda_include_dirs()
        _log(f"building CPU + CUDA kernels ({reason}); archs {archs}")
        if include_dirs:
            _log(f"extra CUDA include dirs: {include_dirs}")
        ext = CUDAExtension(
            "ddim_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("DDIM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"] + arch_flags},
            extra_link_args=link_flags,
        )
    else:
        _log(f"building CPU kernels only ({reason})")
        ext = CppExtension("ddim_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _read_version():
    ns = {}
    with open(os.path.join(ROOT, "ddim_fast", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def main():
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "ddim-fast builds against the torch in this environment, and none is installed.\n"
            "Install torch first (e.g. `pip install torch==2.13.0`), then\n"
            "`pip install --no-build-isolation -e .`"
        )
    setup(
        name="ddim-fast",
        version=_read_version(),
        description="Fast DDIM sampling for standard PyTorch UNets: fused kernels, CUDA graphs, a C++/CUDA extension",
        long_description=open(os.path.join(ROOT, "README.md")).read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["ddim_fast", "ddim_fast.*"]) + ["ddim_fast.kernels"],
        package_dir={"ddim_fast": "ddim_fast", "ddim_fast.kernels": "kernels"},
        package_data={"ddim_fast.apps.pretrained": ["*.pt"], "ddim_fast.apps.data": ["*.npz", "README.md"]},
        ext_modules=_extensions(),
        cmdclass=_cmdclass(),
        install_requires=["torch>=2.4", "numpy", "pillow", "tqdm"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.9", "diffusers", "scipy"],  # Triton < 3.9: its interpreter fails with NumPy >= 2.4
            "triton": ["triton"],
            "diffusers": ["diffusers"],
        },
        entry_points={"console_scripts": ["ddim-fast=ddim_fast.cli:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
