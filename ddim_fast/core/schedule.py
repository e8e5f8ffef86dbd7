"""Noise schedules: betas β_1..β_T and their cumulative products α_t.

Notation of the DDIM paper (Song, Meng & Ermon, ICLR 2021): α_t is DDPM's ᾱ_t, the
cumulative product of (1 - β_s) for s <= t; α at "t = -1", before the first training
step, is 1 (or `final_alpha_cumprod`, diffusers' `set_alpha_to_one=False`).

All math is float64 (NumPy); tensors handed to models and kernels are float32.
"""

from __future__ import annotations

import numpy as np
import torch

from .betas import const_betas, cosine_betas, jsd_betas, linear_betas, quad_betas, sigmoid_betas
from .checks import check_num_train_timesteps
from .diffusers_config import diffusers_schedule
from .grids import timestep_grid
from .solvers.ddim import ddim_sigma

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "sigmoid", "cosine", "scaled_linear")


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
        """(Schedule, sampler options) from a diffusers scheduler (the object, its .config or a
        dict) of the kinds core.diffusers_config.SUPPORTED_SCHEDULERS names (DDIM, DPM-Solver++(2M)
        with or without Karras sigmas, Euler, Euler ancestral, LCM); any other, or an option
        of theirs the samplers do not compute, is refused by name. diffusers itself is not needed.

            schedule, options = Schedule.from_diffusers_config(pipe.scheduler)
            sampler = FastSampler(unet, schedule, steps=50, **options)
        """
        betas, final_alpha_cumprod, options = diffusers_schedule(config)
        return cls.from_betas(betas, final_alpha_cumprod=final_alpha_cumprod), options

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
        return ddim_sigma(self.alpha(t), self.alpha(s), eta)

    def __repr__(self) -> str:
        b = self.betas64
        return f"Schedule(T={self.num_train_timesteps}, betas {b[0]:.3g} .. {b[-1]:.3g}, final_alpha_cumprod={self.final_alpha_cumprod})"
