"""Latent Consistency Models' multistep sampling (Luo et al. 2023, "Latent Consistency Models",
Algorithm 1), as diffusers' LCMScheduler runs it.

The consistency function is x̂₀'s boundary-conditioned mix with x (Song et al. 2023, Eq. 4):

    f(x, t) = c_skip(t) x + c_out(t) x̂₀,   c_skip = σ_d² / ((k t)² + σ_d²),
    c_out = k t / sqrt((k t)² + σ_d²),     σ_d = 0.5, k = 10 (diffusers' timestep_scaling)

and each step but the last noises f back to the next timestep s of the grid with fresh noise:

    x_s = sqrt(ᾱ_s) f + sqrt(1 - ᾱ_s) z;   the last step returns f itself.

So c_x0 = sqrt(ᾱ_s) c_out, c_xt = sqrt(ᾱ_s) c_skip, sigma = sqrt(1 - ᾱ_s) (at the last step
c_out, c_skip and no noise). The grid is LCM's (skip="lcm"); there is no η: the noise is
the algorithm's.
"""

from __future__ import annotations

import math

from ..levels import Levels
from ..plan import C_X0, C_XT, SIGMA, StepPlan, empty_coefs, set_prediction_columns

NAME = "lcm"
LEVELS = "grid"
KARRAS_TIMESTEPS = None
KARRAS_RANGE = None
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def check(eta, use_clipped_model_output: bool):
    if eta is not None:
        raise ValueError(f"solver {NAME!r} draws fresh noise at every step but the last by construction: eta does not apply (leave it unset), got {eta!r}")
    if use_clipped_model_output:
        raise ValueError(f"solver {NAME!r} updates from x and x̂₀ alone, so use_clipped_model_output (eps from the clamped x̂₀) has no meaning there")
    return None


def boundary_scalings(t: float) -> tuple:
    """(c_skip, c_out) of the consistency function at timestep t."""
    scaled = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)


def plan(levels: Levels, eta=None) -> StepPlan:
    """Step i at timestep t_i: f from x and x̂₀ at ᾱ = alphas[i], noised to alphas[i + 1]."""
    check(eta, False)
    steps = levels.steps
    coefs = empty_coefs(steps)
    for i, t in enumerate(levels.timesteps):
        row = coefs[i]
        set_prediction_columns(row, levels.alphas[i], t)
        c_skip, c_out = boundary_scalings(float(t))
        if i == steps - 1:
            row[C_X0], row[C_XT] = c_out, c_skip
            continue
        a_next = levels.alphas[i + 1]
        row[C_X0] = math.sqrt(a_next) * c_out
        row[C_XT] = math.sqrt(a_next) * c_skip
        row[SIGMA] = math.sqrt(1.0 - a_next)
    return StepPlan(levels.timesteps, levels.prev, coefs, NAME)
