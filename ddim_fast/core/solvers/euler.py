"""Euler's method on the probability-flow ODE in σ (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", Algorithm 1 without churn), as diffusers'
EulerDiscreteScheduler runs it.

Karras et al. write the sample in the variance-exploding frame x̃ = x / α (α = sqrt(ᾱ),
σ = sqrt(1 - ᾱ) / α): with the denoised x̂₀ and d = (x̃ - x̂₀) / σ, the step σ -> σ' is

    x̃' = x̃ + (σ' - σ) d = x̂₀ + (σ' / σ) (x̃ - x̂₀)

which in our variance-preserving frame (x = α x̃, the model's input, the state the fused
step keeps) is, with α' and s' = sqrt(1 - ᾱ') of the target and s = sqrt(1 - ᾱ):

    x' = (α' - α s' / s) x̂₀ + (s' / s) x

so c_x0 = α' - α s' / s and c_xt = s' / s: the same step as DDIM's with η = 0 and as
DPM-Solver++'s first order, written in x̂₀ and x so that a clamp of x̂₀ is a clamp of the
denoised sample. The levels are σ interpolated in t (diffusers' interpolation_type="linear";
skip="euler_linspace" gives its default, fractional timesteps) or Karras' (sigmas="karras":
use_karras_sigmas=True, the model called at fractional t).
"""

from __future__ import annotations

import math

from ..checks import check_eta
from ..levels import Levels
from ..plan import C_X0, C_XT, SQRT_ALPHA_T, SQRT_ONE_MINUS_ALPHA_T, StepPlan, empty_coefs, set_prediction_columns

NAME = "euler"
LEVELS = "interpolated"
KARRAS_TIMESTEPS = "float"
KARRAS_RANGE = "grid"


def check(eta, use_clipped_model_output: bool) -> float:
    if eta is not None and check_eta(eta) != 0:
        raise ValueError(f"solver {NAME!r} solves the probability-flow ODE and adds no noise: eta must be 0, got {eta!r} (solver='euler_ancestral' adds noise)")
    if use_clipped_model_output:
        raise ValueError(f"solver {NAME!r} updates from x and x̂₀ alone, so use_clipped_model_output (eps from the clamped x̂₀) has no meaning there")
    return 0.0


def plan(levels: Levels, eta=0.0) -> StepPlan:
    """Step i from ᾱ = alphas[i] to ᾱ' = alphas[i + 1] (see the module's docstring)."""
    check(eta, False)
    coefs = empty_coefs(levels.steps)
    for i, t in enumerate(levels.timesteps):
        row = coefs[i]
        set_prediction_columns(row, levels.alphas[i], t)
        alpha, s = row[SQRT_ALPHA_T], row[SQRT_ONE_MINUS_ALPHA_T]
        a_next = levels.alphas[i + 1]
        alpha_next, s_next = math.sqrt(a_next), math.sqrt(1.0 - a_next)
        row[C_X0] = alpha_next - alpha * s_next / s
        row[C_XT] = s_next / s
    return StepPlan(levels.timesteps, levels.prev, coefs, NAME)
