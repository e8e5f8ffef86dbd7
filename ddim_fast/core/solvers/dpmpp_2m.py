"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2): the probability-flow ODE in data prediction,
second-order multistep, as diffusers' DPMSolverMultistepScheduler runs it with
algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True.

With α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), λ = log(α / σ) and the step s0 -> t (s1 the step before):

    h = λ_t - λ_s0,   first order:  x_t = (σ_t / σ_s0) x - α_t (e^{-h} - 1) x̂₀(s0)
    r0 = (λ_s0 - λ_s1) / h,   D = (1 + 1/(2 r0)) x̂₀(s0) - 1/(2 r0) x̂₀(s1)
    second order:  x_t = (σ_t / σ_s0) x - α_t (e^{-h} - 1) D

so c_xt = σ_t / σ_s0, c_x0 = A (1 + 1/(2 r0)), c_x0_prev = -A / (2 r0) with
A = α_t (1 - e^{-h}) = α_t - α_s0 σ_t / σ_s0 (no infinity when the last step lands on
ᾱ = 1, σ = 0). First order at the first step (no history yet) and at the last when S < 15
or it lands on σ = 0 (diffusers' lower_order_final and final_sigmas_type="zero"), or where
it starts (a grid holding t = 0 with a final ᾱ of ᾱ_0: an identity step). A grid that ends
at t = 0 ends with a large jump in λ (r0 near 0.2 on the linear schedule at S = 10: weights
near 3.3 and -2.3 on the two x̂₀); diffusers' grids (dpm_linspace, dpm_leading, trailing)
leave t = 0 out.
"""

from __future__ import annotations

import math

from ..checks import check_eta
from ..levels import Levels
from ..plan import C_X0, C_X0_PREV, C_XT, SQRT_ALPHA_T, SQRT_ONE_MINUS_ALPHA_T, StepPlan, empty_coefs, set_prediction_columns

NAME = "dpmpp_2m"
LEVELS = "grid"
KARRAS_TIMESTEPS = "round"  # diffusers' DPMSolverMultistepScheduler calls its model at integer timesteps
KARRAS_RANGE = "training"  # diffusers: from σ at t = T - 1 to σ at t = 0, whatever its spacing
LOWER_ORDER_FINAL_BELOW = 15  # diffusers: first order at the last step when S < 15


def check(eta, use_clipped_model_output: bool) -> float:
    if eta is not None and check_eta(eta) != 0:
        raise ValueError(f"solver {NAME!r} (DPM-Solver++(2M)) solves the probability-flow ODE and adds no noise: eta must be 0, got {eta!r}")
    if use_clipped_model_output:
        raise ValueError(f"solver {NAME!r} updates from x and x̂₀ alone, so use_clipped_model_output (eps from the clamped x̂₀) has no meaning there")
    return 0.0


def _lambda(a: float) -> float:
    """λ = log(α / σ) of ᾱ = a: half the log signal-to-noise ratio (+inf at a = 1)."""
    return math.inf if a >= 1.0 else 0.5 * math.log(a / (1.0 - a))


def second_order(i: int, steps: int, alpha_from: float, alpha_to: float) -> bool:
    """Whether step i (of `steps`), from ᾱ = alpha_from to alpha_to, uses the previous x̂₀:
    not at the first (no history yet); at the last, not when S < 15 or it lands on ᾱ = 1
    (diffusers' lower_order_final, final_sigmas_type="zero"), nor when it lands where it
    starts (a grid holding t = 0 with a final ᾱ of ᾱ_0: h = 0, an identity step)."""
    if i == 0:
        return False
    if i == steps - 1 and (steps < LOWER_ORDER_FINAL_BELOW or alpha_to >= 1.0 or alpha_to == alpha_from):
        return False
    return True


def plan(levels: Levels, eta=0.0) -> StepPlan:
    """Step i from ᾱ_s0 = alphas[i] to ᾱ_t = alphas[i + 1] (the last: the run's final level)."""
    check(eta, False)
    ts = levels.timesteps
    steps = levels.steps
    coefs = empty_coefs(steps)
    for i, s0 in enumerate(ts):
        a_s0, a_t = levels.alphas[i], levels.alphas[i + 1]
        row = coefs[i]
        set_prediction_columns(row, a_s0, s0)
        alpha_s0, sigma_s0 = row[SQRT_ALPHA_T], row[SQRT_ONE_MINUS_ALPHA_T]
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        first_order_weight = alpha_t - alpha_s0 * sigma_t / sigma_s0  # α_t (1 - e^{-h})
        row[C_XT] = sigma_t / sigma_s0
        if not second_order(i, steps, a_s0, a_t):
            row[C_X0] = first_order_weight
            continue
        h = _lambda(a_t) - _lambda(a_s0)
        h_prev = _lambda(a_s0) - _lambda(levels.alphas[i - 1])
        if not (h > 0 and h_prev > 0):
            raise ValueError(f"{NAME}: the grid must be strictly increasing in t (steps {ts[i - 1]} -> {s0} -> {levels.prev[i]})")
        r0 = h_prev / h
        row[C_X0] = first_order_weight * (1.0 + 0.5 / r0)
        row[C_X0_PREV] = -first_order_weight * 0.5 / r0
    return StepPlan(ts, levels.prev, coefs, NAME)
