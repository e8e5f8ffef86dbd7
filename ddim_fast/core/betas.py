"""Beta schedules β_1..β_T, in float64 (NumPy): the official DDIM code's and diffusers' names."""

from __future__ import annotations

import math

import numpy as np


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
