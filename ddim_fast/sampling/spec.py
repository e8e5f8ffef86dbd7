"""The step spec: what every step of one loop does, fixed before the loop runs.

The eager loop (sampling/fast.py) and the captured loop (sampling/graph.py) read this and
nothing of the sampler: the plan's coefficient rows (core/plan.py, made by a solver in
core/solvers/), how the model output is read, the clamp, and which buffers the loop needs
(the noise draws, the previous x̂₀ of a multistep solver). GraphCache keys on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.checks import PREDICTION_CODE
from ..core.options import SamplerOptions
from ..core.plan import StepPlan


@dataclass(frozen=True)
class StepSpec:
    """plan: the coefficient rows (compared through `coefs`, their bytes); encoding: DDIM inversion.
    prediction: 0 eps, 1 x0, 2 v. clip: the clamp of x̂₀, (lo, hi) or None. clipped_eps: ε
    recomputed from the clamped x̂₀. has_xt: some step weighs x (c_xt != 0). history: the
    loop keeps the previous x̂₀ (float32, x's layout). noisy: per step, whether it draws
    noise. fast_rng: the step kernel draws it (Philox)."""

    plan: StepPlan = field(compare=False, repr=False)
    coefs: bytes = field(repr=False)  # the plan's rows, compared: another eta or schedule is another spec
    solver: str
    timesteps: tuple
    encoding: bool
    prediction: int
    clip: Optional[tuple]
    clipped_eps: bool
    has_xt: bool
    history: bool
    noisy: tuple
    fast_rng: bool

    @property
    def steps(self) -> int:
        return len(self.noisy)

    @property
    def draws_noise(self) -> bool:
        return any(self.noisy)


def timestep_dtype(timesteps) -> torch.dtype:
    """What a model's t is made of: int64 on the integer grid (as the official code and
    diffusers' DDIM pass it), float32 where some timestep is fractional (diffusers' Euler
    schedulers pass their float32 timesteps)."""
    return torch.long if all(float(t).is_integer() for t in timesteps) else torch.float32


def history_buffer(spec: StepSpec, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A multistep solver's previous x̂₀, zeroed, in x's layout: float32 as every step kernel
    reads it (float64 for float64 x, which only the PyTorch backend takes); None when the spec
    needs none. Made once per loop, before its steps."""
    if not spec.history:
        return None
    return torch.zeros_like(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def step_spec(options: SamplerOptions, plan: StepPlan, *, encoding: bool, fast_rng: bool) -> StepSpec:
    """The spec of `plan` run with `options`; encoding: the inversion (no clamp)."""
    clip = None if encoding else options.clip
    noisy = tuple(plan.draws_noise(i) for i in range(plan.steps))
    return StepSpec(
        plan=plan,
        coefs=plan.coefs.tobytes(),
        solver=plan.solver,
        timesteps=plan.timesteps,
        encoding=encoding,
        prediction=PREDICTION_CODE[options.prediction],
        clip=clip,
        clipped_eps=options.use_clipped_model_output and clip is not None,
        has_xt=plan.has_xt,
        history=plan.history,
        noisy=noisy,
        fast_rng=fast_rng and any(noisy),
    )
