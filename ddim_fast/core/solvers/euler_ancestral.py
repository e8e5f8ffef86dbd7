"""Euler's method with ancestral sampling (k-diffusion's sample_euler_ancestral; with η = 1,
diffusers' EulerAncestralDiscreteScheduler): each step goes down to σ_down with an Euler step
and adds fresh noise of σ_up, so that it lands at σ' in distribution.

In the variance-exploding frame x̃ = x / α (see solvers/euler.py), from σ to σ':

    σ_up = min(σ', η sqrt(σ'² (σ² - σ'²) / σ²)),   σ_down = sqrt(σ'² - σ_up²)
    x̃' = x̂₀ + (σ_down / σ) (x̃ - x̂₀) + σ_up z

and in the variance-preserving frame x = α x̃ (α' = sqrt(ᾱ') of the target):

    x' = α' (1 - σ_down / σ) x̂₀ + (α' σ_down / (α σ)) x + α' σ_up z

so c_x0 = α' (1 - σ_down / σ), c_xt = α' σ_down / (α σ), sigma = α' σ_up. The last step, to
σ' = 0, adds no noise (diffusers draws there all the same: accelerate(pipe) draws and drops).
η = 0 is solver="euler".
"""

from __future__ import annotations

import math

from ..checks import ETA_DDPM_NOISY, check_eta
from ..levels import Levels, sigma_of_alpha
from ..plan import C_X0, C_XT, SIGMA, SQRT_ALPHA_T, StepPlan, empty_coefs, set_prediction_columns

NAME = "euler_ancestral"
LEVELS = "interpolated"
KARRAS_TIMESTEPS = "float"
KARRAS_RANGE = "grid"
DEFAULT_ETA = 1.0  # diffusers' EulerAncestralDiscreteScheduler


def check(eta, use_clipped_model_output: bool) -> float:
    if eta is None:
        return DEFAULT_ETA
    if eta == ETA_DDPM_NOISY:
        raise ValueError(f"solver {NAME!r} takes eta in [0, 1] (the share of the ancestral noise), not {ETA_DDPM_NOISY!r}")
    if use_clipped_model_output:
        raise ValueError(f"solver {NAME!r} updates from x and x̂₀ alone, so use_clipped_model_output (eps from the clamped x̂₀) has no meaning there")
    return check_eta(eta)


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple:
    """(σ_down, σ_up) of the ancestral step σ -> σ_next."""
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def plan(levels: Levels, eta=DEFAULT_ETA) -> StepPlan:
    """Step i from ᾱ = alphas[i] to ᾱ' = alphas[i + 1] (see the module's docstring)."""
    eta = check(eta, False)
    coefs = empty_coefs(levels.steps)
    for i, t in enumerate(levels.timesteps):
        row = coefs[i]
        set_prediction_columns(row, levels.alphas[i], t)
        alpha = row[SQRT_ALPHA_T]
        a_next = levels.alphas[i + 1]
        alpha_next = math.sqrt(a_next)
        sigma = sigma_of_alpha(levels.alphas[i])
        down, up = ancestral_sigmas(sigma, sigma_of_alpha(a_next), eta)
        row[C_X0] = alpha_next * (1.0 - down / sigma)
        row[C_XT] = alpha_next * down / (alpha * sigma)
        row[SIGMA] = alpha_next * up
    return StepPlan(levels.timesteps, levels.prev, coefs, NAME)
