"""Step plans: what every step of a solver does, its coefficients computed once in float64.

Every step of every solver is the one fused update the step kernels compute (ops.step,
ddim_fast/kernels/ddim_step.py, csrc/*/ddim_step.*):

    x̂₀, ε  from (x, model output) with sqrt(α_t), sqrt(1 - α_t)   (x̂₀ clamped if asked)
    x_next = c_x0·x̂₀ + c_eps·ε + c_xt·x + c_x0_prev·x̂₀_prev + sigma·z

where x̂₀_prev is the previous step's x̂₀ (a multistep solver's history, 0 at the first
step). A solver (core/solvers/) is a function from (schedule, grid, options) to a StepPlan:
one row of these coefficients per step. The samplers and the kernels know nothing else of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The columns of StepPlan.coefs, read by name (these indices) in Python and in the kernels.
COEF_COLUMNS = ("sqrt_alpha_t", "sqrt_one_minus_alpha_t", "c_x0", "c_eps", "c_xt", "sigma", "c_x0_prev")
SQRT_ALPHA_T, SQRT_ONE_MINUS_ALPHA_T, C_X0, C_EPS, C_XT, SIGMA, C_X0_PREV = range(len(COEF_COLUMNS))
NUM_COEFS = len(COEF_COLUMNS)


@dataclass(frozen=True)
class StepPlan:
    """What each of the S steps does, in the order they run.

    timesteps: the model's timestep at each step; prev: where the step lands (-1: x0);
    coefs: (S, NUM_COEFS) float64, columns COEF_COLUMNS; solver: the name of the solver
    that made it.
    """

    timesteps: tuple
    prev: tuple
    coefs: np.ndarray
    solver: str = "ddim"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def row(self, i: int) -> tuple:
        """Step i's coefficients as Python floats, in COEF_COLUMNS order (what ops.step takes)."""
        return tuple(float(v) for v in self.coefs[i])

    def draws_noise(self, i: int) -> bool:
        return self.coefs[i, SIGMA] > 0

    @property
    def noisy_steps(self) -> int:
        """How many steps draw noise (σ > 0)."""
        return int((self.coefs[:, SIGMA] > 0).sum())

    @property
    def has_xt(self) -> bool:
        """Some step weighs x itself (c_xt != 0): the DDPM posterior mean, inversion, DPM-Solver."""
        return bool((self.coefs[:, C_XT] != 0).any())

    @property
    def history(self) -> bool:
        """Some step reads the previous step's x̂₀: the loop keeps it in a buffer."""
        return bool((self.coefs[:, C_X0_PREV] != 0).any())


def empty_coefs(steps: int) -> np.ndarray:
    return np.zeros((steps, NUM_COEFS), dtype=np.float64)


def set_prediction_columns(row: np.ndarray, a_t: float, t: int, *, encoding: bool = False) -> None:
    """The row's sqrt(α_t) and sqrt(1 - α_t) at the model's timestep t: how every step reads x̂₀
    and ε off the model output. α_t = 0 (a beta of 1) leaves x̂₀ undefined: refused."""
    if a_t <= 0:
        what = f"cannot encode to t={t}" if encoding else f"x0 cannot be predicted there; use a grid without t={t}"
        raise ValueError(f"alpha_t is 0 at timestep {t} (a beta of 1): {what}")
    row[SQRT_ALPHA_T], row[SQRT_ONE_MINUS_ALPHA_T] = math.sqrt(a_t), math.sqrt(1.0 - a_t)

