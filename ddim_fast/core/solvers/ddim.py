"""DDIM (Song, Meng & Ermon 2021): Eq. 12 for every η, the DDPM posterior mean with σ̂, and
the inversion that encode() runs."""

from __future__ import annotations

import math

from ..checks import ETA_DDPM_NOISY, check_eta
from ..plan import C_EPS, C_X0, C_XT, SIGMA, StepPlan, empty_coefs, set_prediction_columns

NAME = "ddim"


def check(eta, use_clipped_model_output: bool) -> None:
    check_eta(eta)


def sampling_plan(schedule, grid: list[int], eta) -> StepPlan:
    """Steps τ_{S-1} -> τ_{S-2} -> ... -> τ_0 -> -1.

    eta in [0, 1] (Eq. 12 of the DDIM paper): c_x0 = sqrt(α_s), c_eps = sqrt(1 - α_s - σ²).
    eta = "ddpm_noisy": the DDPM posterior mean with σ̂ (the official `ddpm_steps`):
    c_x0 = sqrt(α_s) β̂ / (1 - α_t), c_xt = sqrt(1 - β̂) (1 - α_s) / (1 - α_t),
    β̂ = 1 - α_t / α_s, σ = sqrt(β̂) except at the last step, which adds no noise.
    """
    eta = check_eta(eta)
    ts = list(reversed(grid))
    prev = ts[1:] + [-1]
    coefs = empty_coefs(len(ts))
    for i, (t, s) in enumerate(zip(ts, prev)):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        row = coefs[i]
        set_prediction_columns(row, a_t, t)
        if eta == ETA_DDPM_NOISY:
            beta = max(1.0 - a_t / a_s, 0.0)
            row[C_X0] = math.sqrt(a_s) * beta / (1.0 - a_t)
            row[C_XT] = math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
            row[SIGMA] = math.sqrt(beta) if i < len(ts) - 1 else 0.0
        else:
            sigma = schedule.sigma(t, s, eta)
            row[C_X0] = math.sqrt(a_s)
            row[C_EPS] = math.sqrt(max(1.0 - a_s - sigma * sigma, 0.0))
            row[SIGMA] = sigma
    return StepPlan(tuple(ts), tuple(prev), coefs, NAME)


def encoding_plan(schedule, grid: list[int]) -> StepPlan:
    """DDIM inversion (η = 0, the ODE run forward): steps -1 -> τ_0 -> ... -> τ_{S-1}.

    The step s -> t evaluates the model at t on x_s (the inverse of the sampling step
    t -> s, which evaluates it at t on x_t), converts the output to eps at α_t, and moves
    along the ODE: x_t = sqrt(α_t / α_s) x_s + (sqrt(1 - α_t) - sqrt(α_t (1 - α_s) / α_s)) eps.
    `timesteps` holds the t of each step, `prev` its s.
    """
    ts = list(grid)
    starts = [-1] + ts[:-1]
    coefs = empty_coefs(len(ts))
    for i, (s, t) in enumerate(zip(starts, ts)):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        row = coefs[i]
        set_prediction_columns(row, a_t, t, encoding=True)
        row[C_EPS] = math.sqrt(1.0 - a_t) - math.sqrt(a_t * (1.0 - a_s) / a_s)
        row[C_XT] = math.sqrt(a_t / a_s)
    return StepPlan(tuple(ts), tuple(starts), coefs, NAME)
