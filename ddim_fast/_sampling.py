"""What both samplers share: the validated options, the model call and the input checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ._validate import ETA_DDPM_NOISY, check_bool, check_clip, check_eta, check_prediction, check_steps
from .schedule import Schedule


class SamplerOutput(NamedTuple):
    """What `sample(..., return_x0=True / return_trajectory=True)` returns.

    sample: the final x0, (B, C, H, W). x0_preds: the x̂₀ predicted at each step, in
    sampling order (None unless asked). trajectory: x_T, then x after each step (None
    unless asked).
    """

    sample: torch.Tensor
    x0_preds: Optional[list]
    trajectory: Optional[list]


@dataclass(frozen=True)
class SamplerOptions:
    steps: int
    eta: object  # float in [0, 1] or "ddpm_noisy"
    skip: object  # a name or a tuple of timesteps
    clip: Optional[tuple]  # (lo, hi) or None
    prediction: str
    check_finite: bool
    steps_offset: int
    use_clipped_model_output: bool
    grid: tuple  # the timestep grid, increasing

    @property
    def ddpm_noisy(self) -> bool:
        return self.eta == ETA_DDPM_NOISY


def make_options(schedule, steps, eta, skip, clip_x0, prediction, check_finite, steps_offset, use_clipped_model_output) -> SamplerOptions:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a ddim_fast.Schedule, got {type(schedule).__name__}")
    steps = check_steps(steps, schedule.num_train_timesteps)
    eta = check_eta(eta)
    clip = check_clip(clip_x0)
    prediction = check_prediction(prediction)
    check_bool("check_finite", check_finite)
    check_bool("use_clipped_model_output", use_clipped_model_output)
    grid = schedule.timesteps(steps, skip, steps_offset=steps_offset)
    if not isinstance(skip, str) and len(grid) != steps:
        raise ValueError(f"skip as an explicit grid holds {len(grid)} timesteps but steps={steps}; pass steps={len(grid)}")
    skip_key = skip if isinstance(skip, str) else tuple(grid)
    return SamplerOptions(steps, eta, skip_key, clip, prediction, check_finite, int(steps_offset), use_clipped_model_output, tuple(grid))


def warn_if_training(model, who: str) -> None:
    if isinstance(model, torch.nn.Module) and model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        warnings.warn(f"{who}: the model is in training mode, so dropout makes sampling random; call model.eval() first", UserWarning, stacklevel=3)


def call_model(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return getattr(out, "sample", out)  # diffusers' UNet2DOutput


def check_model_output(out, x: torch.Tensor, step: int, t: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor (or an object with .sample), got {type(out).__name__} at step {step} (t={t})")
    if out.shape != x.shape:
        hint = " (a model that also predicts its variance outputs 2C channels: wrap it to return the first C)" if out.dim() == x.dim() and out.shape[1] == 2 * x.shape[1] else ""
        raise ValueError(f"the model output has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}{hint}")


def model_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def model_dtype(model) -> Optional[torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def sample_shape(model, shape) -> tuple:
    """(C, H, W) of one sample: `shape` if given, else read off the model."""
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be the positive sizes of one sample, e.g. (3, 32, 32), got {shape}")
        return shape
    cfg = getattr(model, "config", None)
    c = getattr(model, "in_channels", None) or getattr(cfg, "in_channels", None)
    r = getattr(model, "resolution", None) or getattr(cfg, "sample_size", None)
    if c is None or r is None:
        raise ValueError("cannot tell the sample shape from this model: pass x_T, or shape=(C, H, W)")
    if isinstance(r, (tuple, list)):
        return (int(c), int(r[0]), int(r[1]))
    return (int(c), int(r), int(r))


def initial_noise(model, x_T, batch_size, generator, shape, device, dtype) -> torch.Tensor:
    """x_T as given (checked), or drawn: torch.randn((batch_size, *shape), generator) in float32."""
    if x_T is not None:
        if batch_size is not None and batch_size != x_T.shape[0]:
            raise ValueError(f"batch_size={batch_size} disagrees with x_T's batch {x_T.shape[0]}; pass one of them")
        return check_input(model, x_T, "x_T")
    if batch_size is None:
        raise ValueError("pass x_T (the initial noise) or batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    shp = sample_shape(model, shape)
    if device is None:
        device = model_device(model) or torch.device("cpu")
    gen_device = generator.device if generator is not None else device
    x = torch.randn((batch_size, *shp), generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype or torch.float32)


def check_input(model, x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched, (B, C, H, W) for an image model, got shape {tuple(x.shape)}")
    c = getattr(model, "in_channels", None) or getattr(getattr(model, "config", None), "in_channels", None)
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


def noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """One draw of the documented noise stream: torch.randn of x's shape, in float32, on
    the generator's device (then moved to x's)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device)
