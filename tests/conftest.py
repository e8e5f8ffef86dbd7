"""Shared fixtures. Without a GPU, Triton kernels run on the CPU through its interpreter."""

import copy
import os

import torch

# must be set before triton is first imported (kernels are decorated at import time); on a
# GPU machine the kernels compile for the GPU instead
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The tests compare fp32 arithmetic with float64 references and with each other. TF32,
    # PyTorch's default for cuDNN convolutions, rounds their inputs to 10 mantissa bits, so
    # two fp32 runs that pick different cuDNN algorithms (under capture, at another batch
    # size) can differ far above fp32's rounding, which these tests bound (graph and eager
    # differed by 4e-5 relative in the H100 run at c872cfc, TF32 on: the suspect). README
    # says what holds with TF32 on.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# Under pytest-xdist every worker's torch starts one CPU thread per core, and OpenMP threads
# that spin at barriers while other workers hold the cores crawl: with 2 workers on this
# 2-core VM, test_quality.py's S = 1000 test took 83-115 s instead of 6.5 s (torch 2.13 and
# 2.11). The GPU machine ran 16 workers x 16 threads at c872cfc: the likely cause of its
# suite not finishing in 9 minutes and of some CPU-test failures there (to confirm on
# hardware). Each worker gets its share of the cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

from ddim_fast import UNet  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The GPU tier (`pytest tests -m gpu`, what benchmarks/gpu_run.sh runs on a device machine):
# every test that needs CUDA, and the CPU tests of the native extension, which on a GPU
# machine exercise the CUDA build of it.
GPU_TIER_FILES = {"test_cuda.py", "test_extension.py", "test_compile.py", "test_triton_compile.py"}
# and the CPU-tensor tests that failed on the GPU machine (H100, c872cfc; ../shared/GPU-NOTES.md)
# and pass here: what differs there is the host (its CPU, a visible GPU, and 16 xdist workers
# of 16 threads each, which slowed the two heaviest of them 17-25x here: the thread share above),
# so the tier runs them there until a green run confirms it (about 25 s of CPU time in all)
GPU_HOST_TESTS = {
    "test_fast_sampler.py::test_fast_equals_reference",
    "test_quality.py::test_reconstruction_error_falls_with_S",
    "test_quality.py::test_samples_from_one_x_T_agree_across_S",
    "test_reliability.py::test_missing_extension_falls_back_and_warns_once",
    "test_reliability.py::test_missing_triton_is_reported_and_nothing_breaks",
    "test_reliability.py::test_no_memory_growth_over_200_calls",
}


def _in_gpu_tier(item) -> bool:
    if item.get_closest_marker("cuda") is not None or item.path.name in GPU_TIER_FILES:
        return True
    if f"{item.path.name}::{item.originalname}" in GPU_HOST_TESTS:
        return True
    if any(str(m.kwargs.get("reason", "")).startswith("needs a CUDA GPU") for m in item.iter_markers("skipif")):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any((isinstance(v, str) and v == "cuda") or (isinstance(v, torch.device) and v.type == "cuda") for v in params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _in_gpu_tier(item):
            item.add_marker(pytest.mark.gpu)


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreter_works_with_numpy():
    """Triton < 3.9's interpreter cannot index with its own scalars under NumPy >= 2.4 (it calls
    int() on 1-element arrays): the GPU image's Triton 3.6 with a current NumPy, for one. The
    kernels are not at fault, so their interpreter tests skip there (setup.py's test extra asks
    for triton>=3.9)."""
    import numpy
    import triton

    version = lambda s: tuple(int(p) for p in s.split("+")[0].split(".")[:2])  # noqa: E731
    return version(triton.__version__) >= (3, 9) or version(numpy.__version__) < (2, 4)


requires_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install triton)")
requires_triton_interpreter = pytest.mark.skipif(
    not _has_triton() or os.environ.get("TRITON_INTERPRET") != "1" or not _interpreter_works_with_numpy(),
    reason="needs triton's CPU interpreter (TRITON_INTERPRET=1, set when there is no GPU), of Triton >= 3.9 with NumPy >= 2.4",
)


def tiny_unet(seed: int = 0, in_channels: int = 1, resolution: int = 8, **kw) -> UNet:
    """A UNet of the standard architecture, small enough for many CPU runs."""
    torch.manual_seed(seed)
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=in_channels, out_ch=in_channels, resolution=resolution)
    cfg.update(kw)
    model = UNet(**cfg).eval()
    # random init gives a near-zero output head: scale it so x0 predictions move
    with torch.no_grad():
        model.conv_out.weight.mul_(20.0)
    return model


@pytest.fixture
def unet():
    return tiny_unet()


class CastModel(torch.nn.Module):
    """The model run in a low-precision dtype inside an fp32 loop: PyTorch's own error at
    that precision, the baseline a low-precision sampler is held to."""

    def __init__(self, model, dtype):
        super().__init__()
        self.inner, self.dtype = copy.deepcopy(model).to(dtype), dtype

    def forward(self, x, t, **model_kwargs):
        return self.inner(x.to(self.dtype), t, **model_kwargs).float()


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()
