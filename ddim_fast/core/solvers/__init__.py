"""Solvers: each turns a run's noise levels (core/levels.py) into a StepPlan (core/plan.py).

A solver is one module here with

    NAME                 the name samplers take (solver=NAME)
    LEVELS               how a timestep grid becomes noise levels: "grid" (ᾱ at each
                         training timestep) or "interpolated" (σ linear in t: fractional
                         timesteps allowed)
    KARRAS_TIMESTEPS     with sigmas="karras": "round" (the model called at integer
                         timesteps), "float", or None (Karras levels not taken)
    KARRAS_RANGE         with sigmas="karras": between the σ of the grid's ends ("grid") or
                         of the training range's ("training")
    check(eta, use_clipped_model_output)  eta as the solver takes it (None: its default),
                         or a ValueError for an option it cannot honour
    plan(levels, eta)    the StepPlan of sampling through `levels`

The fused step, the eager loop and the captured loop read the plan only, so a new solver
is a new module here (and its entry in _MODULES) with its tests. encode() is DDIM's
inversion through the same levels whatever the solver (solvers.ddim.inversion_plan).
"""

from __future__ import annotations

from ..levels import check_sigmas, grid_levels, interpolated_levels, karras_levels
from . import ddim, dpmpp_2m, euler, euler_ancestral, lcm

_MODULES = {module.NAME: module for module in (ddim, dpmpp_2m, euler, euler_ancestral, lcm)}
SOLVERS = tuple(_MODULES)


def check_solver(solver) -> str:
    if not isinstance(solver, str) or solver not in _MODULES:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def check_options(solver: str, eta, use_clipped_model_output: bool, sigmas=None):
    """eta as `solver` takes it (None: the solver's default); a ValueError naming the option
    when `solver` cannot honour it."""
    module = _MODULES[check_solver(solver)]
    if check_sigmas(sigmas) is not None and module.KARRAS_TIMESTEPS is None:
        raise ValueError(f"solver {solver!r} runs on its grid's own noise levels: sigmas={sigmas!r} does not apply")
    return module.check(eta, use_clipped_model_output)


def sampling_levels(solver: str, schedule, grid: list, sigmas=None):
    """The noise levels `solver` samples through on `grid` (increasing) with `sigmas`."""
    module = _MODULES[check_solver(solver)]
    if check_sigmas(sigmas) == "karras":
        return karras_levels(schedule, grid, round_timesteps=module.KARRAS_TIMESTEPS == "round", training_range=module.KARRAS_RANGE == "training")
    if module.LEVELS == "interpolated":
        return interpolated_levels(schedule, grid)
    if any(not float(t).is_integer() for t in grid):
        raise ValueError(f"solver {solver!r} samples on training timesteps; the grid holds fractional ones (skip='euler_linspace' is for the Euler solvers)")
    return grid_levels(schedule, grid)


def plan_of_levels(solver: str, levels, eta):
    return _MODULES[check_solver(solver)].plan(levels, eta)


def sampling_plan(solver: str, schedule, grid: list, eta, sigmas=None):
    """The StepPlan of `solver` on `grid` (increasing) with `eta` and `sigmas`."""
    return plan_of_levels(solver, sampling_levels(solver, schedule, grid, sigmas), eta)
