"""Step plans: the coefficients of every DDIM step, computed once in float64 before a loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checks import ETA_DDPM_NOISY, check_eta
from .schedule import Schedule

# Columns of StepPlan.coefs: every step computes
#   x0, eps from (x, model_output) with sqrt(α_t), sqrt(1 - α_t);
#   x_next = c_x0 * x0 + c_eps * eps + c_xt * x + sigma * z
COEF_COLUMNS = ("sqrt_alpha_t", "sqrt_one_minus_alpha_t", "c_x0", "c_eps", "c_xt", "sigma")


@dataclass(frozen=True)
class StepPlan:
    """What each of the S steps does, in the order they run.

    timesteps: the model's timestep at each step; prev: where the step lands (-1: x0);
    coefs: (S, 6) float64, columns COEF_COLUMNS.
    """

    timesteps: tuple
    prev: tuple
    coefs: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def draws_noise(self, i: int) -> bool:
        return self.coefs[i, 5] > 0

    @property
    def noisy_steps(self) -> int:
        """How many steps draw noise (σ > 0)."""
        return int((self.coefs[:, 5] > 0).sum())


def sampling_plan(schedule: Schedule, grid: list[int], eta) -> StepPlan:
    """Steps τ_{S-1} -> τ_{S-2} -> ... -> τ_0 -> -1.

    eta in [0, 1] (Eq. 12 of the DDIM paper): c_x0 = sqrt(α_s), c_eps = sqrt(1 - α_s - σ²).
    eta = "ddpm_noisy": the DDPM posterior mean with σ̂ (the official `ddpm_steps`):
    c_x0 = sqrt(α_s) β̂ / (1 - α_t), c_xt = sqrt(1 - β̂) (1 - α_s) / (1 - α_t),
    β̂ = 1 - α_t / α_s, σ = sqrt(β̂) except at the last step, which adds no noise.
    """
    eta = check_eta(eta)
    ts = list(reversed(grid))
    prev = ts[1:] + [-1]
    coefs = np.zeros((len(ts), 6), dtype=np.float64)
    for i, (t, s) in enumerate(zip(ts, prev)):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        if a_t <= 0:
            raise ValueError(f"alpha_t is 0 at timestep {t} (a beta of 1): x0 cannot be predicted there; use a grid without t={t}")
        coefs[i, 0], coefs[i, 1] = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        if eta == ETA_DDPM_NOISY:
            beta = max(1.0 - a_t / a_s, 0.0)
            coefs[i, 2] = math.sqrt(a_s) * beta / (1.0 - a_t)
            coefs[i, 4] = math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
            coefs[i, 5] = math.sqrt(beta) if i < len(ts) - 1 else 0.0
        else:
            sigma = schedule.sigma(t, s, eta)
            coefs[i, 2] = math.sqrt(a_s)
            coefs[i, 3] = math.sqrt(max(1.0 - a_s - sigma * sigma, 0.0))
            coefs[i, 5] = sigma
    return StepPlan(tuple(ts), tuple(prev), coefs)


def encoding_plan(schedule: Schedule, grid: list[int]) -> StepPlan:
    """DDIM inversion (η = 0, the ODE run forward): steps -1 -> τ_0 -> ... -> τ_{S-1}.

    The step s -> t evaluates the model at t on x_s (the inverse of the sampling step
    t -> s, which evaluates it at t on x_t), converts the output to eps at α_t, and moves
    along the ODE: x_t = sqrt(α_t / α_s) x_s + (sqrt(1 - α_t) - sqrt(α_t (1 - α_s) / α_s)) eps.
    `timesteps` holds the t of each step, `prev` its s.
    """
    ts = list(grid)
    starts = [-1] + ts[:-1]
    coefs = np.zeros((len(ts), 6), dtype=np.float64)
    for i, (s, t) in enumerate(zip(starts, ts)):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        if a_t <= 0:
            raise ValueError(f"alpha_t is 0 at timestep {t} (a beta of 1): cannot encode to t={t}")
        coefs[i, 0], coefs[i, 1] = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        coefs[i, 3] = math.sqrt(1.0 - a_t) - math.sqrt(a_t * (1.0 - a_s) / a_s)
        coefs[i, 4] = math.sqrt(a_t / a_s)
    return StepPlan(tuple(ts), tuple(starts), coefs)
