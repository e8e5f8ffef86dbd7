"""DDIM (Song, Meng & Ermon 2021): Eq. 12 for every η, the DDPM posterior mean with σ̂, and
the inversion that encode() runs."""

from __future__ import annotations

import math

from ..checks import ETA_DDPM_NOISY, check_eta
from ..levels import Levels, grid_levels
from ..plan import C_EPS, C_X0, C_XT, SIGMA, StepPlan, empty_coefs, set_prediction_columns

NAME = "ddim"
LEVELS = "grid"
KARRAS_TIMESTEPS = None
KARRAS_RANGE = None


def ddim_sigma(a_t: float, a_s: float, eta) -> float:
    """σ of the DDIM step from ᾱ_t to ᾱ_s (Eq. 16 of the DDIM paper), or σ̂ for eta="ddpm_noisy".

    σ_t(η) = η · sqrt((1 - α_s) / (1 - α_t)) · sqrt(1 - α_t / α_s); σ̂_t = sqrt(1 - α_t / α_s).
    """
    eta = check_eta(eta)
    if eta == ETA_DDPM_NOISY:
        return math.sqrt(max(1.0 - a_t / a_s, 0.0))
    return eta * math.sqrt((1.0 - a_s) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_s, 0.0))


def check(eta, use_clipped_model_output: bool):
    return 0.0 if eta is None else check_eta(eta)


def plan(levels: Levels, eta) -> StepPlan:
    """Step i from ᾱ_t = alphas[i] to ᾱ_s = alphas[i + 1].

    eta in [0, 1] (Eq. 12 of the DDIM paper): c_x0 = sqrt(α_s), c_eps = sqrt(1 - α_s - σ²).
    eta = "ddpm_noisy": the DDPM posterior mean with σ̂ (the official `ddpm_steps`):
    c_x0 = sqrt(α_s) β̂ / (1 - α_t), c_xt = sqrt(1 - β̂) (1 - α_s) / (1 - α_t),
    β̂ = 1 - α_t / α_s, σ = sqrt(β̂) except at the last step, which adds no noise.
    """
    eta = check(eta, False)
    steps = levels.steps
    coefs = empty_coefs(steps)
    for i, t in enumerate(levels.timesteps):
        a_t, a_s = levels.alphas[i], levels.alphas[i + 1]
        row = coefs[i]
        set_prediction_columns(row, a_t, t)
        if eta == ETA_DDPM_NOISY:
            beta = max(1.0 - a_t / a_s, 0.0)
            row[C_X0] = math.sqrt(a_s) * beta / (1.0 - a_t)
            row[C_XT] = math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
            row[SIGMA] = math.sqrt(beta) if i < steps - 1 else 0.0
        else:
            sigma = ddim_sigma(a_t, a_s, eta)
            row[C_X0] = math.sqrt(a_s)
            row[C_EPS] = math.sqrt(max(1.0 - a_s - sigma * sigma, 0.0))
            row[SIGMA] = sigma
    return StepPlan(levels.timesteps, levels.prev, coefs, NAME)


def sampling_plan(schedule, grid: list[int], eta) -> StepPlan:
    """Steps τ_{S-1} -> τ_{S-2} -> ... -> τ_0 -> -1 on the training grid (see plan)."""
    return plan(grid_levels(schedule, grid), eta)


def inversion_plan(levels: Levels) -> StepPlan:
    """DDIM inversion (η = 0, the ODE run forward) through `levels` from their end back to
    their start: the steps -1 -> t_{S-1} -> ... -> t_0 (the lowest timestep first).

    The step s -> t evaluates the model at t on x_s (the inverse of the sampling step
    t -> s, which evaluates it at t on x_t), converts the output to eps at α_t, and moves
    along the ODE: x_t = sqrt(α_t / α_s) x_s + (sqrt(1 - α_t) - sqrt(α_t (1 - α_s) / α_s)) eps.
    `timesteps` holds the t of each step, `prev` its s.
    """
    ts = list(reversed(levels.timesteps))
    alphas = list(reversed(levels.alphas))  # alphas[0]: where sampling ends; alphas[i + 1]: at ts[i]
    starts = [-1] + ts[:-1]
    coefs = empty_coefs(len(ts))
    for i, t in enumerate(ts):
        a_s, a_t = alphas[i], alphas[i + 1]
        row = coefs[i]
        set_prediction_columns(row, a_t, t, encoding=True)
        row[C_EPS] = math.sqrt(1.0 - a_t) - math.sqrt(a_t * (1.0 - a_s) / a_s)
        row[C_XT] = math.sqrt(a_t / a_s)
    return StepPlan(tuple(ts), tuple(starts), coefs, NAME)


def encoding_plan(schedule, grid: list[int]) -> StepPlan:
    """DDIM inversion along the training grid `grid` (see inversion_plan)."""
    return inversion_plan(grid_levels(schedule, grid))
