"""The validated options of a sampler: what ReferenceSampler and FastSampler both take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .checks import ETA_DDPM_NOISY, check_bool, check_clip, check_prediction, check_steps
from .levels import Levels
from .schedule import Schedule
from .solvers import check_options as check_solver_options
from .solvers import sampling_levels

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SamplerOptions:
    steps: int
    eta: object  # float in [0, 1] or "ddpm_noisy"; None for a solver without one (lcm)
    skip: object  # a name or a tuple of timesteps
    clip: Optional[tuple]  # (lo, hi) or None
    prediction: str
    check_finite: bool
    steps_offset: int
    use_clipped_model_output: bool
    grid: tuple  # the timestep grid, increasing
    solver: str = "ddim"  # a name of core.solvers.SOLVERS
    sigmas: Optional[str] = None  # None (the grid's noise levels) or "karras"
    levels: Optional[Levels] = None  # the noise levels the solver samples through (core.levels)

    @property
    def ddpm_noisy(self) -> bool:
        return self.eta == ETA_DDPM_NOISY


def make_options(schedule, steps, eta, skip, clip_x0, prediction, check_finite, steps_offset, use_clipped_model_output, solver="ddim", sigmas=None) -> SamplerOptions:
    """eta=None takes the solver's own (0 for DDIM and the ODE solvers, 1 for euler_ancestral,
    none for lcm)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a ddim_fast.Schedule, got {type(schedule).__name__}")
    steps = check_steps(steps, schedule.num_train_timesteps)
    clip = check_clip(clip_x0)
    prediction = check_prediction(prediction)
    check_bool("check_finite", check_finite)
    check_bool("use_clipped_model_output", use_clipped_model_output)
    eta = check_solver_options(solver, eta, use_clipped_model_output, sigmas)
    grid = schedule.timesteps(steps, skip, steps_offset=steps_offset)
    if not isinstance(skip, str) and len(grid) != steps:
        raise ValueError(f"skip as an explicit grid holds {len(grid)} timesteps but steps={steps}; pass steps={len(grid)}")
    skip_key = skip if isinstance(skip, str) else tuple(grid)
    levels = sampling_levels(solver, schedule, grid, sigmas)
    return SamplerOptions(steps, eta, skip_key, clip, prediction, check_finite, int(steps_offset), use_clipped_model_output, tuple(grid), solver, sigmas, levels)


def check_dtype(dtype) -> Optional[torch.dtype]:
    """A sampling dtype: None, a name of DTYPES or torch.float32/float16/bfloat16."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(set(DTYPES))} or a torch dtype, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype
