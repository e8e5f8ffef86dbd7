"""Benchmark options and the machine information recorded with every result.

    pytest benchmarks/ --benchmark-only [--ddim-model digits|small|cifar10] [--ddim-batch 1,16]
                                        [--ddim-steps 10,20,50,100,1000]

Defaults fit the machine: on a CPU the embedded digits UNet at batch 1 and 16; on a GPU
the CIFAR-10 UNet at batch 1 and 64.
"""

import ctypes
import os
import platform

import pytest
import torch

from ddim_fast.apps.machine import cpu_name, git_commit

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    g = parser.getgroup("ddim-fast benchmarks")
    g.addoption("--ddim-model", default=None, help="digits (embedded), small, cifar10, celeba, lsun (default: digits on CPU, cifar10 on GPU)")
    g.addoption("--ddim-batch", default=None, help="comma-separated batch sizes (default: 1,16 on CPU, 1,64 on GPU)")
    g.addoption("--ddim-steps", default="10,20,50,100,1000", help="comma-separated S values")


def _ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


@pytest.fixture(scope="session")
def bench_config(request):
    cuda = torch.cuda.is_available()
    opt = request.config.getoption
    return {
        "device": "cuda" if cuda else "cpu",
        "model": opt("--ddim-model") or ("cifar10" if cuda else "digits"),
        "batches": _ints(opt("--ddim-batch") or ("1,64" if cuda else "1,16")),
        "steps": _ints(opt("--ddim-steps")),
    }


def _steady_allocator() -> str:
    """Pin glibc malloc's thresholds for the run, so that a timing does not depend on the
    allocator's history. By default glibc serves a large allocation with a fresh mmap (page
    faults on first touch) until some earlier free raises its dynamic threshold: on the
    2-core VM the eager DDIM step at 64x3x32x32 measured 1.4 ms in one run and 0.18 ms in
    the next, and aten GroupNorm+SiLU at 16x128x32x32 0.77 ms or 4.9 ms. With blocks up to
    32 MB (glibc's maximum) served from a heap that is never trimmed, every implementation
    reuses warm memory, as it would in a long sampling job. DDIM_FAST_BENCH_MALLOC=default
    keeps glibc's behaviour."""
    if os.environ.get("DDIM_FAST_BENCH_MALLOC", "") == "default":
        return "glibc default (DDIM_FAST_BENCH_MALLOC=default)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return "default (not glibc)"
    return "glibc: mmap threshold 32 MB, no trim" if ok else "glibc default (mallopt refused)"


def pytest_configure(config):
    config._ddim_malloc = _steady_allocator()


def pytest_benchmark_update_machine_info(config, machine_info):
    import ddim_fast

    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["cpu_model"] = cpu_name()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["malloc"] = getattr(config, "_ddim_malloc", None)
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["ddim_fast"] = ddim_fast.__version__
    machine_info["ddim_fast_backends"] = {k: v["available"] for k, v in ddim_fast.backends().items()}
    machine_info["commit"] = git_commit(HERE) or "unknown"
    machine_info["platform"] = platform.platform()


