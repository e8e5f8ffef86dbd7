"""Timestep grids: which of the T training timesteps the S sampling steps visit."""

from __future__ import annotations

import numbers

import numpy as np

from .checks import check_num_train_timesteps, check_steps

SKIP_TYPES = ("uniform", "quad", "leading", "trailing", "linspace", "dpm_linspace", "dpm_leading", "euler_linspace", "lcm")
LCM_ORIGINAL_STEPS = 50  # diffusers' LCMScheduler original_inference_steps: the distillation's grid


def timestep_grid(T: int, steps: int, skip="uniform", steps_offset: int = 0) -> list:
    """The S timesteps τ that sampling visits, in increasing order (ints; floats for "euler_linspace").

    skip:
      "uniform"  range(0, T, T // S), the official default; its first S points when S does
                 not divide T (the official code then runs ceil(T / (T // S)) steps).
                 Equals diffusers' "leading" with steps_offset 0.
      "quad"     int(linspace(0, sqrt(0.8 T), S)²), the official CIFAR-10 choice (for large
                 S it repeats small timesteps, as the official code does; a repeated point
                 is an identity step).
      "leading"  i * (T // S) + steps_offset (diffusers).
      "trailing" round(arange(T, 0, -T / S)) - 1 (diffusers).
      "linspace" round(linspace(0, T - 1, S)) (diffusers).
      "dpm_linspace", "dpm_leading": the S + 1 points of "linspace" / "leading" spacing less
                 the lowest, as diffusers' DPMSolverMultistepScheduler spaces them:
                 round(linspace(0, T - 1, S + 1))[1:], i * (T // (S + 1)) + steps_offset for
                 i = 1..S (the last step then lands on t = -1, not on the dropped point).
      "euler_linspace" linspace(0, T - 1, S) unrounded (float32): diffusers' Euler schedulers'
                 "linspace" spacing, whose noise levels are σ interpolated at fractional t.
      "lcm"      S points of LCM's distillation grid (the 50 timesteps (i + 1) (T // 50) - 1),
                 taken at floor(linspace(0, 50, S, endpoint=False)) from its top, as
                 diffusers' LCMScheduler spaces them (original_inference_steps=50); S <= 50.
      a sequence of distinct ints in [0, T): that grid (sorted).
    """
    T = check_num_train_timesteps(T)
    steps = check_steps(steps, T)
    if not isinstance(skip, str):
        return _explicit_grid(skip, T)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
    if steps_offset and skip not in ("leading", "dpm_leading"):
        raise ValueError(f"steps_offset applies to skip='leading' (or 'dpm_leading') only, got skip={skip!r} with steps_offset={steps_offset}")
    if skip == "uniform":
        grid = list(range(0, T, T // steps))[:steps]
    elif skip == "quad":
        grid = [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2]
    elif skip == "leading":
        grid = [i * (T // steps) + int(steps_offset) for i in range(steps)]
        if grid[-1] >= T:
            raise ValueError(f"skip='leading' with steps_offset={steps_offset} reaches t={grid[-1]} >= T={T}")
    elif skip == "trailing":
        grid = sorted(int(v) for v in (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps])
    elif skip == "linspace":
        grid = [int(v) for v in np.linspace(0, T - 1, steps).round().astype(np.int64)]
    elif skip == "dpm_linspace":
        grid = [int(v) for v in np.linspace(0, T - 1, steps + 1).round().astype(np.int64)[1:]]
    elif skip == "dpm_leading":
        grid = [i * (T // (steps + 1)) + int(steps_offset) for i in range(1, steps + 1)]
        if grid[-1] >= T:
            raise ValueError(f"skip='dpm_leading' with steps_offset={steps_offset} reaches t={grid[-1]} >= T={T}")
    elif skip == "euler_linspace":
        grid = [float(v) for v in np.linspace(0, T - 1, steps, dtype=np.float32)]
    elif skip == "lcm":
        grid = _lcm_grid(T, steps)
    else:
        raise ValueError(f"unknown skip type {skip!r}; expected one of {SKIP_TYPES} or a list of timesteps")
    if skip.startswith("dpm_") and len(set(grid)) != len(grid):
        raise ValueError(f"skip={skip!r} repeats timesteps at S={steps} with T={T} (a multistep solver needs distinct ones); use fewer steps")
    return grid


def _lcm_grid(T: int, steps: int) -> list[int]:
    if T < LCM_ORIGINAL_STEPS or steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"skip='lcm' takes at most {LCM_ORIGINAL_STEPS} of LCM's {LCM_ORIGINAL_STEPS} distillation timesteps (T >= {LCM_ORIGINAL_STEPS}), got steps={steps} with T={T}")
    origin = np.arange(1, LCM_ORIGINAL_STEPS + 1) * (T // LCM_ORIGINAL_STEPS) - 1
    picked = origin[::-1][np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, num=steps, endpoint=False)).astype(np.int64)]
    return sorted(int(v) for v in picked)


def _explicit_grid(skip, T: int) -> list[int]:
    try:
        values = list(skip)
    except TypeError:
        raise TypeError(f"skip must be one of {SKIP_TYPES} or a sequence of ints, got {skip!r}") from None
    if not values:
        raise ValueError("skip as an explicit grid must hold at least one timestep, got an empty sequence")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"skip as an explicit grid must hold ints, got {v!r} in {values!r}")
        if not 0 <= v < T:
            raise ValueError(f"skip as an explicit grid must hold timesteps in [0, {T}), got {v}")
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"skip as an explicit grid must hold distinct timesteps; repeated: {dup}")
    return sorted(int(v) for v in values)
