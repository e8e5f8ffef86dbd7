"""Noise: x_T and the per-step draws of both samplers, seeded noise per sample index, and
spherical interpolation between two x_T.

The samplers' stream (shared by FastSampler and ReferenceSampler, so the two agree for
any η with the same generator): x_T, when not given, is torch.randn((B, C, H, W),
generator) in float32; then each step with σ > 0 draws one torch.randn of x's shape in
float32, in sampling order.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .common import check_input, model_device, sample_shape


def initial_noise(model, x_T, batch_size, generator, shape, device, dtype) -> torch.Tensor:
    """x_T as given (checked), or drawn: torch.randn((batch_size, *shape), generator) in float32."""
    if x_T is not None:
        if batch_size is not None and batch_size != x_T.shape[0]:
            raise ValueError(f"batch_size={batch_size} disagrees with x_T's batch {x_T.shape[0]}; pass one of them")
        return check_input(model, x_T, "x_T")
    if batch_size is None:
        raise ValueError("pass x_T (the initial noise) or batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    shp = sample_shape(model, shape)
    if device is None:
        device = model_device(model) or torch.device("cpu")
    gen_device = generator.device if generator is not None else device
    x = torch.randn((batch_size, *shp), generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype or torch.float32)


def noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """One draw of the documented noise stream: torch.randn of x's shape, in float32, on
    the generator's device (then moved to x's)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device)


def generator_or_default(generator, device: torch.device) -> torch.Generator:
    """The generator a run draws from: the caller's, else the default one of `device`."""
    if generator is not None:
        return generator
    return torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator


def philox_seed(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """fast_rng's seed for one run: one int64 draw from `generator` on its own device, moved
    to `device` ((1,) int64). A CPU generator cannot draw a CUDA tensor."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).to(device)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy's SeedSequence: no collisions by arithmetic)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


def indexed_noise(seed: int, start: int, count: int, shape: Sequence[int]) -> torch.Tensor:
    """x_T for sample indices start .. start+count-1: (count, *shape) float32 on the CPU.

    Sample i's noise depends on (seed, i) only, so any batching of the indices gives the
    same x_T (and, with η = 0, the same images).
    """
    out = torch.empty((count, *shape), dtype=torch.float32)
    for j in range(count):
        out[j] = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(derive_seed(seed, start + j)))
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two x_T of the same shape (as the DDIM paper's Sec. 5.3).

    θ = arccos(<a, b> / (|a| |b|)); slerp = sin((1 - α) θ) / sin θ · a + sin(α θ) / sin θ · b.
    """
    cos = float((a.flatten().double() @ b.flatten().double()) / (a.double().norm() * b.double().norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-6:
        return (1 - alpha) * a + alpha * b
    return (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)
