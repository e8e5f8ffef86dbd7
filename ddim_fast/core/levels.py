"""Noise levels: where each of the S steps of a run starts and where it lands.

Step i calls the model at `timesteps[i]` and moves x from the noise level `alphas[i]` to
`alphas[i + 1]` (ᾱ, the cumulative product: DDIM's α; `alphas[S]` is the level the run ends
at). In the variance-exploding view of Karras et al. (2022) and of diffusers' sigma-based
schedulers a level is σ = sqrt((1 - ᾱ) / ᾱ), so ᾱ = 1 / (1 + σ²). Three placements:

- on the training grid (`grid_levels`: DDIM, DPM-Solver++, LCM): ᾱ_i is the schedule's
  ᾱ at the integer t_i, and the run ends at the schedule's final ᾱ;
- interpolated σ (`interpolated_levels`: diffusers' Euler schedulers with
  interpolation_type="linear"): σ_i is linear in t between the two training timesteps
  around t_i, so a fractional t (skip="euler_linspace") has a level too;
- Karras σ (`karras_levels`, sigmas="karras"; Karras et al. 2022, Eq. 5 with ρ = 7): S
  levels from σ_max down to σ_min, the σ of the grid's highest and lowest timesteps (the
  Euler solvers, as diffusers' Euler schedulers) or of the training range's (DPM-Solver++,
  as diffusers' DPMSolverMultistepScheduler, whose spacing then plays no part); the model's
  t is σ mapped back to t (log σ linear between training timesteps), rounded for a solver
  that calls its model at integer timesteps (DPM-Solver++, as diffusers does).

The σ of the training timesteps are computed as diffusers' schedulers compute them (a
float32 cumulative product, float32 σ), so that the model is called at diffusers' own t
and a rounded t never falls on the other side of .5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SIGMA_SCHEDULES = ("karras",)
KARRAS_RHO = 7.0  # Karras et al. (2022), Eq. 5: the value used in the paper and by diffusers


@dataclass(frozen=True)
class Levels:
    """timesteps: the model's t at each step, in sampling order (ints on the integer grid,
    floats off it). alphas: S + 1 levels ᾱ (float64), step i from alphas[i] to alphas[i + 1].
    prev: the timestep each step lands on (-1 after the last), for plans and messages."""

    timesteps: tuple
    alphas: tuple
    prev: tuple

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def integral(self) -> bool:
        """Whether every model timestep is an integer (the model then gets int64 timesteps)."""
        return all(float(t).is_integer() for t in self.timesteps)


def alpha_of_sigma(sigma: float) -> float:
    """ᾱ = 1 / (1 + σ²): 1 at σ = 0 (the data)."""
    return 1.0 / (1.0 + sigma * sigma)


def sigma_of_alpha(alpha: float) -> float:
    """σ = sqrt((1 - ᾱ) / ᾱ)."""
    return math.sqrt((1.0 - alpha) / alpha)


def _timestep(t):
    """A timestep as an int when it is one, else as the float it is."""
    value = float(t)
    return int(value) if value.is_integer() else value


def _levels(timesteps: Sequence, alphas: Sequence) -> Levels:
    ts = tuple(_timestep(t) for t in timesteps)
    return Levels(ts, tuple(float(a) for a in alphas), ts[1:] + (-1,))


def grid_levels(schedule, grid: Sequence[int]) -> Levels:
    """The levels of the training timesteps of `grid` (increasing), sampled from its highest,
    ending at the schedule's final ᾱ (α at "t = -1")."""
    ts = [int(t) for t in reversed(grid)]
    return _levels(ts, [schedule.alpha(t) for t in ts] + [schedule.final_alpha_cumprod])


def training_sigmas(schedule) -> np.ndarray:
    """(T,) float32: σ of every training timestep as diffusers' schedulers compute it."""
    alphas_cumprod = torch.cumprod(1.0 - torch.from_numpy(schedule.betas64).float(), dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def _sigma_levels(timesteps: Sequence, sigmas: Sequence, schedule) -> Levels:
    """Levels of float32 σ (as the schedulers keep them), ending at the schedule's final ᾱ
    (diffusers' final_sigmas_type "zero": ᾱ = 1, "sigma_min": ᾱ_0)."""
    sigmas32 = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
    alphas = [alpha_of_sigma(float(s)) for s in sigmas32] + [schedule.final_alpha_cumprod]
    return _levels(timesteps, alphas)


def interpolated_levels(schedule, grid: Sequence) -> Levels:
    """σ at each timestep of `grid` (increasing; fractional timesteps allowed), linear in t
    between the training timesteps around it (diffusers' Euler schedulers,
    interpolation_type="linear"); the model is called at those t."""
    sigmas = training_sigmas(schedule)
    ts = np.asarray(list(reversed(grid)), dtype=np.float32)
    return _sigma_levels(ts.tolist(), np.interp(ts, np.arange(len(sigmas)), sigmas), schedule)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each σ: log σ linear between the two training
    timesteps whose σ bracket it, clamped to [0, T - 1]."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    distances = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """Karras et al. (2022), Eq. 5: σ_i = (σ_max^(1/ρ) + i/(S-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0, 1, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def karras_levels(schedule, grid: Sequence, *, round_timesteps: bool, training_range: bool) -> Levels:
    """S = len(grid) Karras levels from σ_max to σ_min: the σ of the grid's highest and lowest
    timesteps (interpolated there as in interpolated_levels; diffusers' Euler schedulers), or
    with training_range those of t = T - 1 and t = 0 whatever the grid (diffusers'
    DPMSolverMultistepScheduler). The model is called at each σ's t, rounded when
    round_timesteps; the final level is the schedule's, as on any grid."""
    sigmas = training_sigmas(schedule)
    top, bottom = (len(sigmas) - 1, 0) if training_range else (max(grid), min(grid))
    ends = np.interp(np.asarray([top, bottom], dtype=np.float32), np.arange(len(sigmas)), sigmas).astype(np.float32)
    levels = karras_sigmas(float(ends[0]), float(ends[1]), len(grid))
    ts = _sigma_to_t(levels, np.log(sigmas))
    ts = ts.round() if round_timesteps else ts.astype(np.float32)
    return _sigma_levels(ts.tolist(), levels, schedule)


def check_sigmas(sigmas):
    """A sampler's `sigmas` option: None (the grid's own levels) or a name of SIGMA_SCHEDULES."""
    if sigmas is not None and sigmas not in SIGMA_SCHEDULES:
        raise ValueError(f"sigmas must be None (the grid's own noise levels) or one of {SIGMA_SCHEDULES}, got {sigmas!r}")
    return sigmas
