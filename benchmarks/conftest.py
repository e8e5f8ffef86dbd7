"""Benchmark options and the machine information recorded with every result.

    pytest benchmarks/ --benchmark-only [--ddim-model digits|small|cifar10] [--ddim-batch 1,16]
                                        [--ddim-steps 10,20,50,100,1000] [--ddim-compile-mode max-autotune]

Defaults fit the machine: on a CPU the embedded digits UNet at batch 1 and 16; on a GPU
the CIFAR-10 UNet at batch 1 and 64.
"""

import os
import platform

import pytest
import torch

from ddim_fast._machine import cpu_name, git_commit

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    g = parser.getgroup("ddim-fast benchmarks")
    g.addoption("--ddim-model", default=None, help="digits (embedded), small, cifar10, celeba, lsun (default: digits on CPU, cifar10 on GPU)")
    g.addoption("--ddim-batch", default=None, help="comma-separated batch sizes (default: 1,16 on CPU, 1,64 on GPU)")
    g.addoption("--ddim-steps", default="10,20,50,100,1000", help="comma-separated S values")
    g.addoption("--ddim-compile-mode", default="max-autotune", help="torch.compile mode of the `compile` baseline (GPU)")


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
        "compile_mode": opt("--ddim-compile-mode"),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    import ddim_fast

    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["cpu_model"] = cpu_name()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch_threads"] = torch.get_num_threads()
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


