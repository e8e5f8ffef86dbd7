"""A diffusers scheduler's config as a schedule (its betas and final ᾱ) and the sampler options
that run what it runs (diffusers itself is not needed): Schedule.from_diffusers_config.

    DDIMScheduler                      solver="ddim"
    DPMSolverMultistepScheduler        solver="dpmpp_2m" (use_karras_sigmas: sigmas="karras")
    EulerDiscreteScheduler             solver="euler" (use_karras_sigmas: sigmas="karras")
    EulerAncestralDiscreteScheduler    solver="euler_ancestral"
    LCMScheduler                       solver="lcm"

Betas as diffusers computes them (in float32, then our float64 math); the grid as the
scheduler spaces its timesteps; the final level as its set_alpha_to_one / final_sigmas_type
say (the schedule's final_alpha_cumprod). Any other scheduler, and any option of these that
the samplers do not compute, is refused with a ValueError that names it: a config is never
run as something else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .betas import cosine_betas
from .grids import LCM_ORIGINAL_STEPS
from .solvers import lcm

SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler")
_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DDIM_SPACING = ("leading", "trailing", "linspace")


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _refuse(scheduler: str, key: str, value, what: str) -> None:
    raise ValueError(f"{scheduler} with {key}={value!r} is not what ddim-fast computes ({what}); set it, or run the pipeline's own loop")


# keys that only other diffusers schedulers' configs have (with DDIM's own two missing, a
# config carrying one is another scheduler's: DDIMScheduler.from_config keeps them all)
_OTHER_SCHEDULER_KEYS = (
    "algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "lambda_min_clipped", "use_lu_lambdas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "interpolation_type", "sigma_min", "sigma_max", "timestep_type", "skip_prk_steps", "variance_type",
    "disable_corrector", "predict_x0", "flow_shift", "use_flow_sigmas", "original_inference_steps", "timestep_scaling",
)  # fmt: skip
_DDIM_OWN_KEYS = ("clip_sample", "set_alpha_to_one")
# keys that, together, only one scheduler's config has (its .config carries no class name)
_OWN_KEYS = {
    "DPMSolverMultistepScheduler": ("algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type", "lambda_min_clipped", "use_lu_lambdas"),
    "EulerDiscreteScheduler": ("interpolation_type", "use_karras_sigmas", "timestep_type", "final_sigmas_type"),
    "LCMScheduler": ("original_inference_steps", "timestep_scaling"),
}
_SWITCH_HINT = "pass the scheduler object itself (or a config with its _class_name), or switch it first: scheduler = DDIMScheduler.from_config(scheduler.config)"


def _scheduler_config(config) -> tuple:
    """(class name or None, config) of a scheduler given as the object, its .config or a dict."""
    if not isinstance(config, Mapping) and hasattr(config, "config"):  # a scheduler object
        return type(config).__name__, config.config
    return _get(config, "_class_name"), config


def _kind_of_bare_config(config) -> str:
    """The scheduler a config without a class name belongs to, from the keys only it has; a
    ValueError when they say two things or when a scheduler's whole config says none."""
    if not isinstance(config, Mapping):
        return "DDIMScheduler"
    owners = [name for name, keys in _OWN_KEYS.items() if all(k in config for k in keys)]
    ddim_own = all(k in config for k in _DDIM_OWN_KEYS)
    if owners == ["LCMScheduler"] and ddim_own:  # LCM's config holds DDIM's keys too
        raise ValueError(f"this config has the keys of both LCMScheduler and DDIMScheduler, which a DDIMScheduler made from an LCM config also has; {_SWITCH_HINT}")
    if len(owners) == 1 and not ddim_own:
        return owners[0]
    if owners and not ddim_own:
        raise ValueError(f"this config has the keys of {' and '.join(owners)}; {_SWITCH_HINT}")
    if ddim_own:
        return "DDIMScheduler"
    foreign = [k for k in _OTHER_SCHEDULER_KEYS if k in config]
    made_by_diffusers = type(config).__name__ == "FrozenDict" or "_use_default_values" in config
    if foreign or made_by_diffusers:  # a scheduler's whole config, not DDIM's
        hint = f" (it has {', '.join(foreign)})" if foreign else f" (it lacks {' and '.join(k for k in _DDIM_OWN_KEYS if k not in config)})"
        raise ValueError(f"this is not a DDIMScheduler config{hint}, nor one whose scheduler its keys tell; ddim-fast runs {', '.join(SUPPORTED_SCHEDULERS)}: {_SWITCH_HINT}")
    return "DDIMScheduler"  # a hand-written dict of DDIM's options


def diffusers_schedule(config) -> tuple:
    """(betas, final ᾱ, sampler options) from a scheduler object, its .config or a dict (see
    the module's docstring for what each scheduler maps to): Schedule.from_diffusers_config."""
    name, config = _scheduler_config(config)
    if name is None:
        name = _kind_of_bare_config(config)
    mapper = _MAPPERS.get(name)
    if mapper is None:
        raise ValueError(
            f"the {name} config describes a sampler ddim-fast does not run; it runs {', '.join(SUPPORTED_SCHEDULERS)}. "
            "Switch the scheduler first: scheduler = DDIMScheduler.from_config(scheduler.config)"
        )
    return mapper(config)


def _prediction(config) -> str:
    pred = _get(config, "prediction_type", "epsilon")
    if pred not in _PREDICTION:
        raise ValueError(f"unknown prediction_type {pred!r}; expected one of {tuple(_PREDICTION)}")
    return _PREDICTION[pred]


def _refuse_flags(scheduler: str, config, flags) -> None:
    for flag in flags:
        if _get(config, flag, False):
            raise ValueError(f"{scheduler} option {flag}=True is not supported by ddim-fast; run the pipeline's own loop")


def _spacing(config, default: str, names: dict) -> str:
    spacing = _get(config, "timestep_spacing", default)
    if spacing not in names:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {tuple(names)}")
    return spacing


# --- DDIMScheduler ---------------------------------------------------------------------------


def _ddim_options(config) -> tuple:
    """With "leading" spacing the samplers reproduce diffusers' DDIM loop; with "trailing" and
    "linspace" the previous point is the next element of the actual grid, where diffusers
    steps to t - T // S. set_alpha_to_one=False makes α at t = -1 equal α_0."""
    betas = _diffusers_betas(config)
    _refuse_flags("DDIMScheduler", config, ("thresholding", "rescale_betas_zero_snr"))
    alphas_cumprod0 = float(np.cumprod(1.0 - betas)[0])
    final = 1.0 if _get(config, "set_alpha_to_one", True) else alphas_cumprod0
    spacing = _spacing(config, "leading", dict.fromkeys(_DDIM_SPACING))
    clip = float(_get(config, "clip_sample_range", 1.0)) if _get(config, "clip_sample", True) else False
    options = dict(skip=spacing, clip_x0=clip, prediction=_prediction(config))
    if spacing == "leading":
        options["steps_offset"] = int(_get(config, "steps_offset", 0))
    return betas, final, options


# --- DPMSolverMultistepScheduler ----------------------------------------------------------------

# its options and the values of them that solver="dpmpp_2m" is
_DPM_REQUIRED = (
    ("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("solver_type", "midpoint"), ("lower_order_final", True),
    ("euler_at_final", False), ("thresholding", False), ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False), ("use_lu_lambdas", False), ("use_flow_sigmas", False), ("use_dynamic_shifting", False),
    ("variance_type", None), ("rescale_betas_zero_snr", False),
)  # fmt: skip
_DPM_SPACING = {"linspace": "dpm_linspace", "leading": "dpm_leading", "trailing": "trailing"}


def _dpm_options(config) -> tuple:
    """solver="dpmpp_2m" with its grid (skip "dpm_linspace", "dpm_leading" or "trailing", as it
    spaces the timesteps) and its last step's target (final_sigmas_type "zero": ᾱ = 1,
    "sigma_min": ᾱ_0). use_karras_sigmas=True: sigmas="karras" between the σ of t = T - 1 and
    t = 0 (its spacing then plays no part: skip="linspace" has those ends), the model called
    at the rounded t. Any variant solver="dpmpp_2m" does not compute (SDE, third order, Heun,
    thresholding, ...) is refused by name."""
    final_type = _get(config, "final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final_sigmas_type {final_type!r}; expected 'zero' or 'sigma_min'")
    for key, wanted in _DPM_REQUIRED:
        value = _get(config, key, wanted)
        # landing on σ = 0, diffusers takes the last step first order whatever these two say
        same_anyway = key in ("lower_order_final", "euler_at_final") and final_type == "zero"
        if value != wanted and not same_anyway:
            _refuse("DPMSolverMultistepScheduler", key, value, f"DPM-Solver++(2M), solver='dpmpp_2m': {key}={wanted!r}")
    betas = _diffusers_betas(config)
    karras = bool(_get(config, "use_karras_sigmas", False))
    if karras and _get(config, "beta_schedule", "linear") == "squaredcos_cap_v2":
        _refuse("DPMSolverMultistepScheduler", "use_karras_sigmas", True, "with beta_schedule='squaredcos_cap_v2' it truncates the Karras timesteps instead of rounding them")
    lambda_min = _get(config, "lambda_min_clipped", -math.inf)
    if lambda_min is not None and _clipped_timesteps(betas, float(lambda_min)) > 0:
        raise ValueError(f"DPMSolverMultistepScheduler with lambda_min_clipped={lambda_min!r} clips its grid, which ddim-fast does not do")
    final = 1.0 if final_type == "zero" else float(np.cumprod(1.0 - betas)[0])
    spacing = _spacing(config, "linspace", _DPM_SPACING)
    options = dict(solver="dpmpp_2m", skip=_DPM_SPACING[spacing], clip_x0=False, prediction=_prediction(config))
    if karras:
        options.update(skip="linspace", sigmas="karras")
    elif spacing == "leading":
        options["steps_offset"] = int(_get(config, "steps_offset", 0))
    return betas, final, options


def _clipped_timesteps(betas: np.ndarray, lambda_min: float) -> int:
    """How many of the highest timesteps DPMSolverMultistepScheduler leaves out of its grid for
    lambda_min_clipped (those with λ below it), with λ in float32 as it computes it."""
    if not math.isfinite(lambda_min):
        return 0
    alphas_cumprod = torch.cumprod(1.0 - torch.from_numpy(betas).float(), dim=0)
    lam = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    return int(torch.searchsorted(torch.flip(lam, [0]), lambda_min))


# --- Euler and Euler ancestral ------------------------------------------------------------------

_EULER_SPACING = {"linspace": "euler_linspace", "leading": "leading", "trailing": "trailing"}


def _euler_grid(config) -> dict:
    spacing = _spacing(config, "linspace", _EULER_SPACING)
    grid = dict(skip=_EULER_SPACING[spacing])
    if spacing == "leading":
        grid["steps_offset"] = int(_get(config, "steps_offset", 0))
    return grid


def _euler_options(config) -> tuple:
    """solver="euler" on σ interpolated at its timesteps, or sigmas="karras" (between the σ of
    its grid's ends, the model called at fractional t); final_sigmas_type "zero" (ᾱ = 1) or
    "sigma_min" (ᾱ_0). Refused by name: interpolation_type="log_linear", exponential or beta
    sigmas, a sigma_min / sigma_max of its own, EDM's continuous timesteps, zero terminal SNR."""
    name = "EulerDiscreteScheduler"
    if _get(config, "interpolation_type", "linear") != "linear":
        _refuse(name, "interpolation_type", _get(config, "interpolation_type"), "σ interpolated linearly in t: 'linear'")
    _refuse_flags(name, config, ("use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"))
    karras = bool(_get(config, "use_karras_sigmas", False))
    for key in ("sigma_min", "sigma_max"):
        if karras and _get(config, key) is not None:
            _refuse(name, key, _get(config, key), "Karras sigmas between the σ of the grid's ends")
    prediction = _prediction(config)
    if _get(config, "timestep_type", "discrete") == "continuous" and prediction == "v":
        _refuse(name, "timestep_type", "continuous", "the model called at training timesteps, not EDM's 0.25 log σ")
    final_type = _get(config, "final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final_sigmas_type {final_type!r}; expected 'zero' or 'sigma_min'")
    betas = _diffusers_betas(config)
    final = 1.0 if final_type == "zero" else float(np.cumprod(1.0 - betas)[0])
    options = dict(solver="euler", clip_x0=False, prediction=prediction, **_euler_grid(config))
    if karras:
        options["sigmas"] = "karras"
    return betas, final, options


def _euler_ancestral_options(config) -> tuple:
    """solver="euler_ancestral" (its η of 1) on σ interpolated at its timesteps, ending at σ = 0.
    prediction_type="sample" is refused, as its step refuses it."""
    name = "EulerAncestralDiscreteScheduler"
    _refuse_flags(name, config, ("rescale_betas_zero_snr",))
    prediction = _prediction(config)
    if prediction == "x0":
        _refuse(name, "prediction_type", "sample", "its step does not implement it")
    options = dict(solver="euler_ancestral", clip_x0=False, prediction=prediction, **_euler_grid(config))
    return _diffusers_betas(config), 1.0, options


# --- LCMScheduler ---------------------------------------------------------------------------


def _lcm_options(config) -> tuple:
    """solver="lcm" on LCM's grid (skip="lcm": its timestep_spacing and steps_offset play no part
    in LCMScheduler's grid), its clamp of x̂₀ (clip_sample). Refused by name: an
    original_inference_steps other than 50, a timestep_scaling other than 10, thresholding,
    zero terminal SNR."""
    name = "LCMScheduler"
    _refuse_flags(name, config, ("thresholding", "rescale_betas_zero_snr"))
    original = _get(config, "original_inference_steps", LCM_ORIGINAL_STEPS)
    if original != LCM_ORIGINAL_STEPS:
        _refuse(name, "original_inference_steps", original, f"LCM's distillation grid of {LCM_ORIGINAL_STEPS} steps")
    scaling = _get(config, "timestep_scaling", lcm.TIMESTEP_SCALING)
    if scaling != lcm.TIMESTEP_SCALING:
        _refuse(name, "timestep_scaling", scaling, f"the boundary condition at {lcm.TIMESTEP_SCALING:g} t")
    clip = float(_get(config, "clip_sample_range", 1.0)) if _get(config, "clip_sample", False) else False
    options = dict(solver="lcm", skip="lcm", clip_x0=clip, prediction=_prediction(config))
    return _diffusers_betas(config), 1.0, options


_MAPPERS = {
    "DDIMScheduler": _ddim_options,
    "DPMSolverMultistepScheduler": _dpm_options,
    "EulerDiscreteScheduler": _euler_options,
    "EulerAncestralDiscreteScheduler": _euler_ancestral_options,
    "LCMScheduler": _lcm_options,
}


def _diffusers_betas(config) -> np.ndarray:
    """Betas as diffusers computes them (float32), in float64."""
    T = int(_get(config, "num_train_timesteps", 1000))
    start, end = float(_get(config, "beta_start", 0.0001)), float(_get(config, "beta_end", 0.02))
    kind = _get(config, "beta_schedule", "linear")
    trained = _get(config, "trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32).double().numpy()
    elif kind == "scaled_linear":
        betas = (torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2).double().numpy()
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(T).astype(np.float32).astype(np.float64)
    else:
        raise ValueError(f"unknown diffusers beta_schedule {kind!r}; expected linear, scaled_linear or squaredcos_cap_v2")
    return betas
