"""Solvers: each turns (schedule, grid, options) into a StepPlan (core/plan.py).

A solver is one module here with

    NAME                                  the name samplers take (solver=NAME)
    check(eta, use_clipped_model_output)  a ValueError for an option it cannot honour
    sampling_plan(schedule, grid, eta)    the StepPlan of sampling along `grid` (increasing)

The fused step, the eager loop and the captured loop read the plan only, so a new solver
is a new module here (and its entry in SOLVERS) with its tests. encode() is DDIM's
inversion whatever the solver (solvers.ddim.encoding_plan).
"""

from __future__ import annotations

from . import ddim, dpmpp_2m

_MODULES = {module.NAME: module for module in (ddim, dpmpp_2m)}
SOLVERS = tuple(_MODULES)


def check_solver(solver) -> str:
    if not isinstance(solver, str) or solver not in _MODULES:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def check_options(solver: str, eta, use_clipped_model_output: bool) -> None:
    """A ValueError naming the option when `solver` cannot honour it."""
    _MODULES[check_solver(solver)].check(eta, use_clipped_model_output)


def sampling_plan(solver: str, schedule, grid: list, eta):
    return _MODULES[check_solver(solver)].sampling_plan(schedule, grid, eta)
