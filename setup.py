"""Build ddim_fast and, when torch is visible to the build, its native extension ddim_fast._C.

What gets built is decided here, in plain sight, and printed:

- the C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built;
- the CUDA kernels (csrc/cuda/*.cu) are built when torch is a CUDA build and nvcc is
  found, or when FORCE_CUDA=1; DDIM_FAST_SKIP_CUDA=1 skips them;
- DDIM_FAST_CUDA_ARCHS="80;90" picks the GPU architectures (default: 80 and 90, plus
  PTX for the newest so that later GPUs can JIT it).

A missing nvcc warns and builds the CPU part; it never fails the install. The extension
must be compiled against the torch that imports it. `pip install --no-build-isolation -e .`
compiles it here, ahead of time. A plain `pip install -e .` builds in an isolated
environment without torch: then nothing is compiled here, and ddim_fast compiles csrc/
on first use against the torch that is running (ddim_fast/ops/jit.py), with the same
recipe (ddim_fast/ops/build.py) and a cache. Either way the sources ship with the package.
"""

import importlib.util
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[ddim-fast setup] {msg}", file=sys.stderr)


def _recipe():
    """ddim_fast/ops/build.py, loaded by its path: the package itself cannot be imported yet."""
    spec = importlib.util.spec_from_file_location("_ddim_fast_build", os.path.join(ROOT, "ddim_fast", "ops", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions(torch):
    """The extension to compile against `torch` (decide_cuda runs before
    torch.utils.cpp_extension is imported: that module reads CUDA_HOME once, at import)."""
    recipe = _recipe()
    build_cuda, reason, cuda_home = recipe.decide_cuda(torch)
    if not build_cuda and "nvcc not found" in reason:
        _log(f"WARNING: {reason}; building the CPU kernels only")
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    root = os.path.relpath(os.path.join(ROOT, "csrc"))
    cpu_isa, cxx_flags, link_flags = recipe.cxx_flags(torch)
    _log(f"CPU kernels use the {cpu_isa} vector ISA (DDIM_FAST_CPU_CAPABILITY=avx512|avx2|default to choose)")
    if build_cuda:
        archs = recipe.cuda_archs()
        # torch's own arch detection needs a GPU; name the list so it does not guess.
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
        include_dirs = recipe.pip_cuda_include_dirs()
        _log(f"building CPU + CUDA kernels ({reason}); archs {archs}")
        if include_dirs:
            _log(f"extra CUDA include dirs: {include_dirs}")
        ext = CUDAExtension(
            "ddim_fast._C",
            recipe.sources(root, cuda=True),
            include_dirs=include_dirs,
            define_macros=[("DDIM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": recipe.nvcc_flags(archs)},
            extra_link_args=link_flags,
        )
    else:
        _log(f"building CPU kernels only ({reason})")
        ext = CppExtension("ddim_fast._C", recipe.sources(root, cuda=False), extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    ext.ddim_fast_info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": build_cuda, "cpu_isa": cpu_isa}
    return [ext]


def _build_ext_class():
    """torch's BuildExtension (ninja when there is one), which also writes _C.build.json
    beside the library: the torch it was built against, read before it is ever loaded."""
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildWithInfo(base):
        def run(self):
            super().run()
            for ext in self.extensions:
                info = getattr(ext, "ddim_fast_info", None)
                if info is not None:
                    path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C.build.json")
                    with open(path, "w") as f:
                        json.dump(info, f, indent=1)

    return BuildWithInfo


def _read_version():
    ns = {}
    with open(os.path.join(ROOT, "ddim_fast", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def main():
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        # pip's isolated build (a plain `pip install -e .`), or no torch at all: install_requires
        # brings torch in the second case; the kernels are compiled on first use in both.
        _log(
            "torch is not visible to this build (pip builds in an isolated environment unless given "
            "--no-build-isolation): nothing is compiled now; ddim_fast compiles its native kernels on "
            "first use against the torch that imports it, and caches them"
        )
        ext_modules, cmdclass = [], {}
    else:
        ext_modules, cmdclass = _extensions(torch), {"build_ext": _build_ext_class()}
    setup(
        name="ddim-fast",
        version=_read_version(),
        description="Fast DDIM sampling for standard PyTorch UNets: fused kernels, CUDA graphs, a C++/CUDA extension",
        long_description=open(os.path.join(ROOT, "README.md")).read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["ddim_fast", "ddim_fast.*"]) + ["ddim_fast._csrc"],
        # csrc/ installs as ddim_fast/_csrc, the sources of a first-use build
        package_dir={"ddim_fast": "ddim_fast", "ddim_fast._csrc": "csrc"},
        package_data={
            "ddim_fast.apps.pretrained": ["*.pt"],
            "ddim_fast.apps.data": ["*.npz", "README.md"],
            "ddim_fast._csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=["torch>=2.4", "numpy", "pillow", "tqdm", "ninja"],  # ninja: torch.utils.cpp_extension's first-use build
        extras_require={
            # Triton < 3.9: its interpreter fails with NumPy >= 2.4; transformers: the test pipelines'
            # text encoder; peft: the LoRA adapters diffusers adds (tests/test_lora.py)
            "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.9", "diffusers", "transformers", "scipy", "peft"],
            "triton": ["triton"],
            "diffusers": ["diffusers"],
        },
        entry_points={"console_scripts": ["ddim-fast=ddim_fast.cli:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
