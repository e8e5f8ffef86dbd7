"""Noise schedules, timestep grids and the per-step coefficients of DDIM.

Notation of the DDIM paper (Song, Meng & Ermon, ICLR 2021): α_t is DDPM's ᾱ_t, the
cumulative product of (1 - β_s) for s <= t; α at "t = -1", before the first training
step, is 1 (or `final_alpha_cumprod`, diffusers' `set_alpha_to_one=False`).

All math is float64 (NumPy); tensors handed to models and kernels are float32.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ._validate import ETA_DDPM_NOISY, check_eta, check_num_train_timesteps, check_steps

SKIP_TYPES = ("uniform", "quad", "leading", "trailing", "linspace")
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


# --- timestep grids ---------------------------------------------------------------------


def timestep_grid(T: int, steps: int, skip="uniform", steps_offset: int = 0) -> list[int]:
    """The S training timesteps τ that sampling visits, in increasing order.

    skip:
      "uniform"  range(0, T, T // S), the official default; its first S points when S does
                 not divide T (the official code then runs ceil(T / (T // S)) steps).
                 Equals diffusers' "leading" with steps_offset 0.
      "quad"     int(linspace(0, sqrt(0.8 T), S)²), the official CIFAR-10 choice (for large
                 S it repeats small timesteps, as the official code does; a repeated point
                 is an identity step).
      "leading"  i * (T // S) + steps_offset (diffusers).
      "trailing" round(arange(T, 0, -T / S)) - 1 (diffusers).
      "linspace" round(linspace(0, T - 1, S)) (diffusers).
      a sequence of distinct ints in [0, T): that grid (sorted).
    """
    T = check_num_train_timesteps(T)
    steps = check_steps(steps, T)
    if not isinstance(skip, str):
        return _explicit_grid(skip, T)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
    if steps_offset and skip != "leading":
        raise ValueError(f"steps_offset applies to skip='leading' only, got skip={skip!r} with steps_offset={steps_offset}")
    if skip == "uniform":
        grid = list(range(0, T, T // steps))[:steps]
    elif skip == "quad":
        grid = [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2]
    elif skip == "leading":
        grid = [i * (T // steps) + int(steps_offset) for i in range(steps)]
        if grid[-1] >= T:
            raise ValueError(f"skip='leading' with steps_offset={steps_offset} reaches t={grid[-1]} >= T={T}")
    elif skip == "trailing":
        grid = sorted(int(v) for v in (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps])
    elif skip == "linspace":
        grid = [int(v) for v in np.linspace(0, T - 1, steps).round().astype(np.int64)]
    else:
        raise ValueError(f"unknown skip type {skip!r}; expected one of {SKIP_TYPES} or a list of timesteps")
    return grid


def _explicit_grid(skip, T: int) -> list[int]:
    try:
        values = list(skip)
    except TypeError:
        raise TypeError(f"skip must be one of {SKIP_TYPES} or a sequence of ints, got {skip!r}") from None
    if not values:
        raise ValueError("skip as an explicit grid must hold at least one timestep, got an empty sequence")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"skip as an explicit grid must hold ints, got {v!r} in {values!r}")
        if not 0 <= v < T:
            raise ValueError(f"skip as an explicit grid must hold timesteps in [0, {T}), got {v}")
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"skip as an explicit grid must hold distinct timesteps; repeated: {dup}")
    return sorted(int(v) for v in values)


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
        """(Schedule, sampler options) from a diffusers DDIMScheduler config; see
        ddim_fast.diffusers_compat.schedule_from_diffusers_config. diffusers itself is not needed.

            schedule, options = Schedule.from_diffusers_config(scheduler.config)
            sampler = FastSampler(unet, schedule, steps=50, **options)
        """
        from .diffusers_compat import schedule_from_diffusers_config

        return schedule_from_diffusers_config(config)

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


# --- per-step coefficients ------------------------------------------------------------------

# Columns of StepPlan.coefs: every step computes
#   x0, eps from (x, model_output) with sqrt(α_t), sqrt(1 - α_t);
#   x_next = c_x0 * x0 + c_eps * eps + c_xt * x + sigma * z
COEF_COLUMNS = ("sqrt_alpha_t", "sqrt_one_minus_alpha_t", "c_x0", "c_eps", "c_xt", "sigma")


@dataclass(frozen=True)
class StepPlan:
    """What each of the S steps does, in the order they run.

    timesteps: the model's timestep at each step; prev: where the step lands (-1: x0);
    coefs: (S, 6) float64, columns COEF_COLUMNS.
    """

    timesteps: tuple
    prev: tuple
    coefs: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def draws_noise(self, i: int) -> bool:
        return self.coefs[i, 5] > 0


def sampling_plan(schedule: Schedule, grid: list[int], eta) -> StepPlan:
    """Steps τ_{S-1} -> τ_{S-2} -> ... -> τ_0 -> -1.

    eta in [0, 1] (Eq. 12 of the DDIM paper): c_x0 = sqrt(α_s), c_eps = sqrt(1 - α_s - σ²).
    eta = "ddpm_noisy": the DDPM posterior mean with σ̂ (the official `ddpm_steps`):
    c_x0 = sqrt(α_s) β̂ / (1 - α_t), c_xt = sqrt(1 - β̂) (1 - α_s) / (1 - α_t),
    β̂ = 1 - α_t / α_s, σ = sqrt(β̂) except at the last step, which adds no noise.
    """
    eta = check_eta(eta)
    ts = list(reversed(grid))
    prev = ts[1:] + [-1]
    coefs = np.zeros((len(ts), 6), dtype=np.float64)
    for i, (t, s) in enumerate(zip(ts, prev)):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        if a_t <= 0:
            raise ValueError(f"alpha_t is 0 at timestep {t} (a beta of 1): x0 cannot be predicted there; use a grid without t={t}")
        coefs[i, 0], coefs[i, 1] = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        if eta == ETA_DDPM_NOISY:
            beta = max(1.0 - a_t / a_s, 0.0)
            coefs[i, 2] = math.sqrt(a_s) * beta / (1.0 - a_t)
            coefs[i, 4] = math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
            coefs[i, 5] = math.sqrt(beta) if i < len(ts) - 1 else 0.0
        else:
            sigma = schedule.sigma(t, s, eta)
            coefs[i, 2] = math.sqrt(a_s)
            coefs[i, 3] = math.sqrt(max(1.0 - a_s - sigma * sigma, 0.0))
            coefs[i, 5] = sigma
    return StepPlan(tuple(ts), tuple(prev), coefs)


def encoding_plan(schedule: Schedule, grid: list[int]) -> StepPlan:
    """DDIM inversion (η = 0, the ODE run forward): steps -1 -> τ_0 -> ... -> τ_{S-1}.

    The step s -> t evaluates the model at t on x_s (the inverse of the sampling step
    t -> s, which evaluates it at t on x_t), converts the output to eps at α_t, and moves
    along the ODE: x_t = sqrt(α_t / α_s) x_s + (sqrt(1 - α_t) - sqrt(α_t (1 - α_s) / α_s)) eps.
    `timesteps` holds the t of each step, `prev` its s.
    """
    ts = list(grid)
    starts = [-1] + ts[:-1]
    coefs = np.zeros((len(ts), 6), dtype=np.float64)
    for i, (s, t) in enumerate(zip(starts, ts)):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        if a_t <= 0:
            raise ValueError(f"alpha_t is 0 at timestep {t} (a beta of 1): cannot encode to t={t}")
        coefs[i, 0], coefs[i, 1] = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        coefs[i, 3] = math.sqrt(1.0 - a_t) - math.sqrt(a_t * (1.0 - a_s) / a_s)
        coefs[i, 4] = math.sqrt(a_t / a_s)
    return StepPlan(tuple(ts), tuple(starts), coefs)
