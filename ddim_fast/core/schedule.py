"""Noise schedules: betas β_1..β_T and their cumulative products α_t.

Notation of the DDIM paper (Song, Meng & Ermon, ICLR 2021): α_t is DDPM's ᾱ_t, the
cumulative product of (1 - β_s) for s <= t; α at "t = -1", before the first training
step, is 1 (or `final_alpha_cumprod`, diffusers' `set_alpha_to_one=False`).

All math is float64 (NumPy); tensors handed to models and kernels are float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .checks import ETA_DDPM_NOISY, check_eta, check_num_train_timesteps
from .grids import timestep_grid

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "sigmoid", "cosine", "scaled_linear")


# --- beta schedules (float64) ---------------------------------------------------------


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule (the official default: 1e-4 -> 0.02 over T = 1000)."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def quad_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear in sqrt(beta) (the official "quad"; diffusers' "scaled_linear" is the same formula)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def const_betas(T: int, beta_end: float = 0.02) -> np.ndarray:
    return np.full(T, beta_end, dtype=np.float64)


def jsd_betas(T: int) -> np.ndarray:
    """1/T, 1/(T-1), ..., 1: the official "jsd" schedule (its last beta is 1, so alpha_{T-1} = 0)."""
    return 1.0 / np.linspace(T, 1, T, dtype=np.float64)


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
    return s * (beta_end - beta_start) + beta_start


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2")."""

    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], dtype=np.float64)


# --- the schedule -------------------------------------------------------------------------


class Schedule:
    """A diffusion noise schedule: betas β_1..β_T and α_t = ∏(1 - β_s) (DDIM's notation).

    Math in float64; `betas`, `alphas_cumprod`, `sqrt_alphas_cumprod` and
    `sqrt_one_minus_alphas_cumprod` are float32 CPU tensors of shape (T,).
    """

    def __init__(self, betas, *, final_alpha_cumprod: float = 1.0):
        b = np.asarray(betas.detach().cpu().double().numpy() if torch.is_tensor(betas) else betas, dtype=np.float64)
        if b.ndim != 1 or b.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {b.shape}")
        bad = ~((b > 0) & (b <= 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"betas must lie in (0, 1], got betas[{i}] = {float(b[i])!r}")
        if not (0 < final_alpha_cumprod <= 1):
            raise ValueError(f"final_alpha_cumprod must lie in (0, 1], got {final_alpha_cumprod!r}")
        self.betas64 = b
        self.alphas_cumprod64 = np.cumprod(1.0 - b)
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.betas = torch.from_numpy(b).float()
        self.alphas_cumprod = torch.from_numpy(self.alphas_cumprod64).float()
        self.sqrt_alphas_cumprod = torch.from_numpy(np.sqrt(self.alphas_cumprod64)).float()
        self.sqrt_one_minus_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 - self.alphas_cumprod64)).float()

    # constructors -------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        return cls(linear_betas(check_num_train_timesteps(num_train_timesteps), beta_start, beta_end))

    @classmethod
    def quad(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        return cls(quad_betas(check_num_train_timesteps(num_train_timesteps), beta_start, beta_end))

    @classmethod
    def scaled_linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> "Schedule":
        return cls(quad_betas(check_num_train_timesteps(num_train_timesteps), beta_start, beta_end))

    @classmethod
    def const(cls, num_train_timesteps: int = 1000, beta_end: float = 0.02) -> "Schedule":
        return cls(const_betas(check_num_train_timesteps(num_train_timesteps), beta_end))

    @classmethod
    def jsd(cls, num_train_timesteps: int = 1000) -> "Schedule":
        return cls(jsd_betas(check_num_train_timesteps(num_train_timesteps)))

    @classmethod
    def sigmoid(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        return cls(sigmoid_betas(check_num_train_timesteps(num_train_timesteps), beta_start, beta_end))

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        return cls(cosine_betas(check_num_train_timesteps(num_train_timesteps), s, max_beta))

    @classmethod
    def from_betas(cls, betas, *, final_alpha_cumprod: float = 1.0) -> "Schedule":
        return cls(betas, final_alpha_cumprod=final_alpha_cumprod)

    @classmethod
    def from_diffusers_config(cls, config) -> tuple:
        """(Schedule, sampler options) from a diffusers DDIMScheduler or DPMSolverMultistepScheduler
        (the object or its config); see
        `schedule_from_diffusers_config`. diffusers itself is not needed.

            schedule, options = Schedule.from_diffusers_config(scheduler.config)
            sampler = FastSampler(unet, schedule, steps=50, **options)
        """
        return schedule_from_diffusers_config(config)

    @classmethod
    def from_spec(cls, spec: dict) -> "Schedule":
        """The schedule a spec names, as pretrained files record it:
        {"name": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}."""
        spec = dict(spec)
        name = spec.pop("name", None)
        if name is None:
            raise ValueError(f"a schedule spec needs a 'name' (e.g. 'linear'), got {spec!r}")
        return cls.from_name(name, **spec)

    @classmethod
    def from_name(cls, name: str, num_train_timesteps: int = 1000, **kwargs) -> "Schedule":
        """By the official config's `beta_schedule` name (or diffusers' `squaredcos_cap_v2`)."""
        name = {"squaredcos_cap_v2": "cosine"}.get(name, name)
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {name!r}; expected one of {BETA_SCHEDULES}")
        return getattr(cls, name)(num_train_timesteps, **kwargs)

    # queries --------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas64.shape[0])

    def alpha(self, t: int) -> float:
        """α_t in float64; t = -1 gives final_alpha_cumprod (1 by default)."""
        if t == -1:
            return self.final_alpha_cumprod
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [-1, {self.num_train_timesteps}), got {t}")
        return float(self.alphas_cumprod64[t])

    def timesteps(self, steps: int, skip="uniform", *, steps_offset: int = 0) -> list[int]:
        """The sampling grid (increasing); see `timestep_grid`."""
        return timestep_grid(self.num_train_timesteps, steps, skip, steps_offset)

    def sigma(self, t: int, s: int, eta) -> float:
        """σ of the step t -> s (Eq. 16 of the DDIM paper), or σ̂ for eta="ddpm_noisy".

        σ_t(η) = η · sqrt((1 - α_s) / (1 - α_t)) · sqrt(1 - α_t / α_s); σ̂_t = sqrt(1 - α_t / α_s).
        """
        eta = check_eta(eta)
        a_t, a_s = self.alpha(t), self.alpha(s)
        if eta == ETA_DDPM_NOISY:
            return math.sqrt(max(1.0 - a_t / a_s, 0.0))
        return eta * math.sqrt((1.0 - a_s) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_s, 0.0))

    def __repr__(self) -> str:
        b = self.betas64
        return f"Schedule(T={self.num_train_timesteps}, betas {b[0]:.3g} .. {b[-1]:.3g}, final_alpha_cumprod={self.final_alpha_cumprod})"


# --- diffusers' DDIMScheduler config (diffusers itself is not needed) ----------------------

_DIFFUSERS_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DIFFUSERS_SPACING = ("leading", "trailing", "linspace")


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


# keys that only other diffusers schedulers' configs have (with DDIM's own two missing, a
# config carrying one is another scheduler's: DDIMScheduler.from_config keeps them all)
_OTHER_SCHEDULER_KEYS = (
    "algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "lambda_min_clipped", "use_lu_lambdas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "interpolation_type", "sigma_min", "sigma_max", "timestep_type", "skip_prk_steps", "variance_type",
    "disable_corrector", "predict_x0", "flow_shift", "use_flow_sigmas", "original_inference_steps", "timestep_scaling",
)  # fmt: skip
_DDIM_OWN_KEYS = ("clip_sample", "set_alpha_to_one")
DDIM_SCHEDULERS = ("DDIMScheduler",)
DPM_SCHEDULERS = ("DPMSolverMultistepScheduler",)


def _scheduler_config(config) -> tuple:
    """(class name or None, config) of a scheduler given as the object, its .config or a dict."""
    if not isinstance(config, Mapping) and hasattr(config, "config"):  # a scheduler object
        return type(config).__name__, config.config
    return _get(config, "_class_name"), config


def _ddim_config(name, config):
    """The config of a DDIMScheduler; a ValueError naming the scheduler for any other we do not
    take, whose config would sample with DDIM unnoticed."""
    if name is not None and name not in DDIM_SCHEDULERS:
        raise ValueError(
            f"the {name} config describes another sampler than DDIM; ddim-fast samples with DDIM and "
            "DPM-Solver++(2M) (DPMSolverMultistepScheduler) only. "
            "Switch the scheduler first: scheduler = DDIMScheduler.from_config(scheduler.config)"
        )
    if name is None and isinstance(config, Mapping):
        foreign = [k for k in _OTHER_SCHEDULER_KEYS if k in config]
        own = all(k in config for k in _DDIM_OWN_KEYS)
        made_by_diffusers = type(config).__name__ == "FrozenDict"  # a scheduler's whole config
        if (foreign or made_by_diffusers) and not own:
            hint = f" (it has {', '.join(foreign)})" if foreign else f" (it lacks {' and '.join(k for k in _DDIM_OWN_KEYS if k not in config)})"
            raise ValueError(
                f"this is not a DDIMScheduler config{hint}; ddim-fast samples with DDIM and DPM-Solver++(2M) (DPMSolverMultistepScheduler) only. "
                "Switch the scheduler first: scheduler = DDIMScheduler.from_config(scheduler.config)"
            )
    return config


def schedule_from_diffusers_config(config) -> tuple:
    """(Schedule, sampler options) from a DDIMScheduler or a DPMSolverMultistepScheduler: the
    scheduler object, its .config or a dict. The config of another scheduler (Euler, PNDM,
    UniPC, ...) is refused with a ValueError that names it.

    Betas as diffusers computes them (in float32, then our float64 math); options: skip,
    steps_offset, clip_x0 (clip_sample / clip_sample_range), prediction (prediction_type).
    set_alpha_to_one=False makes α at t = -1 equal α_0. With "leading" spacing our
    samplers reproduce diffusers' DDIM loop; with "trailing" and "linspace" the previous
    point is the next element of the actual grid, where diffusers steps to t - T // S.
    A DPMSolverMultistepScheduler maps to solver="dpmpp_2m" (see _dpm_options).
    """
    name, config = _scheduler_config(config)
    if name in DPM_SCHEDULERS or (name is None and _is_dpm_multistep(config)):
        return _dpm_options(config)
    config = _ddim_config(name, config)
    betas = _diffusers_betas(config)
    for flag in ("thresholding", "rescale_betas_zero_snr"):
        if _get(config, flag, False):
            raise ValueError(f"DDIMScheduler option {flag}=True is not supported by ddim-fast")
    alphas_cumprod0 = float(np.cumprod(1.0 - betas)[0])
    final = 1.0 if _get(config, "set_alpha_to_one", True) else alphas_cumprod0
    schedule = Schedule.from_betas(betas, final_alpha_cumprod=final)
    spacing = _get(config, "timestep_spacing", "leading")
    if spacing not in _DIFFUSERS_SPACING:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {_DIFFUSERS_SPACING}")
    clip = float(_get(config, "clip_sample_range", 1.0)) if _get(config, "clip_sample", True) else False
    offset = int(_get(config, "steps_offset", 0))
    options = dict(skip=spacing, clip_x0=clip, prediction=_diffusers_prediction(config))
    if spacing == "leading":
        options["steps_offset"] = offset
    return schedule, options


def _diffusers_prediction(config) -> str:
    pred = _get(config, "prediction_type", "epsilon")
    if pred not in _DIFFUSERS_PREDICTION:
        raise ValueError(f"unknown prediction_type {pred!r}; expected one of {tuple(_DIFFUSERS_PREDICTION)}")
    return _DIFFUSERS_PREDICTION[pred]


# DPMSolverMultistepScheduler options and the values of them that solver="dpmpp_2m" is
_DPM_REQUIRED = (
    ("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("solver_type", "midpoint"), ("lower_order_final", True),
    ("euler_at_final", False), ("thresholding", False), ("use_karras_sigmas", False), ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False), ("use_lu_lambdas", False), ("use_flow_sigmas", False), ("use_dynamic_shifting", False),
    ("variance_type", None), ("rescale_betas_zero_snr", False),
)  # fmt: skip
_DPM_SPACING = {"linspace": "dpm_linspace", "leading": "dpm_leading", "trailing": "trailing"}
# keys that, together, only a DPMSolverMultistepScheduler's config has (its .config carries no
# class name); a DDIM config made from one has DDIM's own keys too, and stays DDIM's
_DPM_OWN_KEYS = ("algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type", "lambda_min_clipped", "use_lu_lambdas")


def _is_dpm_multistep(config) -> bool:
    return isinstance(config, Mapping) and all(k in config for k in _DPM_OWN_KEYS) and not all(k in config for k in _DDIM_OWN_KEYS)


def _dpm_options(config) -> tuple:
    """(Schedule, options) of a DPMSolverMultistepScheduler config: solver="dpmpp_2m" with its
    grid (skip "dpm_linspace", "dpm_leading" or "trailing", as it spaces the timesteps) and
    its last step's target (final_sigmas_type "zero": ᾱ = 1, "sigma_min": ᾱ_0). Any variant
    solver="dpmpp_2m" does not compute (SDE, third order, Heun, Karras sigmas, thresholding,
    ...) is refused by name."""
    final_type = _get(config, "final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final_sigmas_type {final_type!r}; expected 'zero' or 'sigma_min'")
    for key, wanted in _DPM_REQUIRED:
        value = _get(config, key, wanted)
        # landing on σ = 0, diffusers takes the last step first order whatever these two say
        same_anyway = key in ("lower_order_final", "euler_at_final") and final_type == "zero"
        if value != wanted and not same_anyway:
            raise ValueError(
                f"DPMSolverMultistepScheduler with {key}={value!r} is not what ddim-fast's solver='dpmpp_2m' computes "
                f"(DPM-Solver++(2M): {key}={wanted!r}); set it, or run the pipeline's own loop"
            )
    betas = _diffusers_betas(config)
    lambda_min = _get(config, "lambda_min_clipped", -math.inf)
    if lambda_min is not None and _clipped_timesteps(betas, float(lambda_min)) > 0:
        raise ValueError(f"DPMSolverMultistepScheduler with lambda_min_clipped={lambda_min!r} clips its grid, which ddim-fast does not do")
    final = 1.0 if final_type == "zero" else float(np.cumprod(1.0 - betas)[0])
    spacing = _get(config, "timestep_spacing", "linspace")
    if spacing not in _DPM_SPACING:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {tuple(_DPM_SPACING)}")
    options = dict(solver="dpmpp_2m", skip=_DPM_SPACING[spacing], clip_x0=False, prediction=_diffusers_prediction(config))
    if spacing == "leading":
        options["steps_offset"] = int(_get(config, "steps_offset", 0))
    return Schedule.from_betas(betas, final_alpha_cumprod=final), options


def _clipped_timesteps(betas: np.ndarray, lambda_min: float) -> int:
    """How many of the highest timesteps DPMSolverMultistepScheduler leaves out of its grid for
    lambda_min_clipped (those with λ below it), with λ in float32 as it computes it."""
    if not math.isfinite(lambda_min):
        return 0
    alphas_cumprod = torch.cumprod(1.0 - torch.from_numpy(betas).float(), dim=0)
    lam = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    return int(torch.searchsorted(torch.flip(lam, [0]), lambda_min))


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
