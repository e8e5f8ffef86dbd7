"""Shared fixtures. Without a GPU, Triton kernels run on the CPU through its interpreter."""

import os

import torch

# must be set before triton is first imported (kernels are decorated at import time); on a
# GPU machine the kernels compile for the GPU instead
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddim_fast import UNet  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install triton)")
requires_triton_interpreter = pytest.mark.skipif(
    not _has_triton() or os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton's CPU interpreter (TRITON_INTERPRET=1, set when there is no GPU)"
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


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()
