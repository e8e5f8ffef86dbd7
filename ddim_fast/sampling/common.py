"""What both samplers share: the result type, the model call and the input checks."""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import NamedTuple, Optional

import torch

from ..models.prepare import model_device
from ..ops.dispatch import dense_layout


class SamplerOutput(NamedTuple):
    """What `sample(..., return_x0=True / return_trajectory=True)` returns.

    sample: the final x0, (B, C, H, W). x0_preds: the x̂₀ predicted at each step, in
    sampling order (None unless asked). trajectory: x_T, then x after each step (None
    unless asked).
    """

    sample: torch.Tensor
    x0_preds: Optional[list]
    trajectory: Optional[list]


def warn_if_training(model, who: str) -> None:
    if isinstance(model, torch.nn.Module) and model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        warnings.warn(f"{who}: the model is in training mode, so dropout makes sampling random; call model.eval() first", UserWarning, stacklevel=3)


def on_device(x: torch.Tensor):
    """x's device made current while a sampler runs (torch.cuda.device): Triton launches, side
    streams and graph captures go to the current device, so with x on cuda:1 and cuda:0
    current they would all go to cuda:0 (the native ops guard themselves). A no-op off CUDA."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def laid_out_like(reference: torch.Tensor, out: torch.Tensor, buffer: Optional[torch.Tensor]) -> tuple:
    """(out in reference's layout, the buffer used): out itself when it already is, else a copy
    into `buffer` (made like reference on first need). The fused step reads the model output
    with x's flat offsets, and a model may return another layout (a wrapper's .contiguous(),
    a slice of a 2C output)."""
    if dense_layout(reference, out):
        return out, buffer
    if buffer is None:
        buffer = torch.empty_like(reference)
    return buffer.copy_(out), buffer


def check_model(model, who: str) -> None:
    """A sampler's model: a callable model(x, t), not a diffusers pipeline (which is callable too,
    and would fail deep inside diffusers)."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is not None and isinstance(model, diffusers.DiffusionPipeline):
        raise TypeError(
            f"{who} takes the denoising model (pipe.unet), not a {type(model).__name__}; "
            "to run the whole pipeline with ddim-fast's sampler use ddim_fast.accelerate(pipe)"
        )
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")


def call_model(model, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
    out = model(x, t, **model_kwargs)
    if isinstance(out, tuple):  # diffusers' return_dict=False
        return out[0]
    return getattr(out, "sample", out)  # diffusers' UNet2DOutput


def check_model_output(out, x: torch.Tensor, step: int, t: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor (or an object with .sample, or a tuple of them), got {type(out).__name__} at step {step} (t={t})")
    if out.shape != x.shape:
        hint = " (a model that also predicts its variance outputs 2C channels: wrap it to return the first C)" if out.dim() == x.dim() and out.shape[1] == 2 * x.shape[1] else ""
        raise ValueError(f"the model output has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}{hint}")


def _in_channels(model):
    """A model's input channels: its config's (diffusers, which deprecates the attribute), else its own."""
    return getattr(getattr(model, "config", None), "in_channels", None) or getattr(model, "in_channels", None)


def sample_shape(model, shape) -> tuple:
    """(C, H, W) of one sample: `shape` if given, else read off the model."""
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be the positive sizes of one sample, e.g. (3, 32, 32), got {shape}")
        return shape
    cfg = getattr(model, "config", None)
    c = _in_channels(model)
    r = getattr(model, "resolution", None) or getattr(cfg, "sample_size", None)
    if c is None or r is None:
        raise ValueError("cannot tell the sample shape from this model: pass x_T, or shape=(C, H, W)")
    if isinstance(r, (tuple, list)):
        return (int(c), int(r[0]), int(r[1]))
    return (int(c), int(r), int(r))


def check_input(model, x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched, (B, C, H, W) for an image model, got shape {tuple(x.shape)}")
    c = _in_channels(model)
    if c is not None and x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W) for this image model, got shape {tuple(x.shape)}")
    if c is not None and x.shape[1] != c:
        raise ValueError(f"{name} must have the model's {c} channels, got shape {tuple(x.shape)}")
    dev = model_device(model)
    if dev is not None and dev != x.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {dev}; move one of them")
    return x


def check_finite(x: torch.Tensor, step: int, t: int, what: str = "sampling") -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} produced NaN or Inf at step {step} (t={t}); check the model, its dtype and the schedule")
