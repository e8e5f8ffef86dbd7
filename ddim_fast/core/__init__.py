"""The base layer: schedules, timestep grids, step plans and argument checks, in float64
math on NumPy and plain torch tensors. It imports no other layer of ddim_fast and never
torch.nn.

    checks    argument checks shared by every layer
    grids     timestep grids (uniform, quad, leading, trailing, linspace, dpm_*, euler_linspace, lcm, explicit)
    betas     beta schedules (linear, quad, cosine, ...), float64
    schedule  Schedule: betas and α_t; from a name, a spec or a diffusers config
    levels    the noise levels a run steps through: on the grid, σ interpolated, Karras σ
    diffusers_config  a diffusers scheduler's config as a Schedule and sampler options
    plan      StepPlan: the coefficients of each step, in named columns
    solvers   the solvers that make plans: ddim (sampling and encoding), dpmpp_2m, euler,
              euler_ancestral, lcm
    options   the validated options both samplers take
"""

from .grids import SKIP_TYPES, timestep_grid
from .plan import COEF_COLUMNS, StepPlan
from .solvers import SOLVERS
from .solvers.ddim import encoding_plan, sampling_plan
from .schedule import Schedule

__all__ = ["Schedule", "StepPlan", "sampling_plan", "encoding_plan", "timestep_grid", "SKIP_TYPES", "COEF_COLUMNS", "SOLVERS"]
