"""Noise: x_T and the per-step draws of both samplers, seeded noise per sample index, and
spherical interpolation between two x_T.

The samplers' stream (shared by FastSampler and ReferenceSampler, so the two agree for
any η with the same generator): x_T, when not given, is torch.randn((B, C, H, W),
generator) in float32; then each step with σ > 0 draws one torch.randn of x's shape in
float32, in sampling order. Two variations, both as diffusers' pipelines draw (its
randn_tensor): a list of B generators draws each sample's (1, C, H, W) from its own
generator, in batch order; and noise_dtype draws in another dtype (the pipelines draw in
their UNet's), the values then used as float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .common import check_input, model_device, sample_shape


class NoiseStream:
    """Where a run's noise comes from: one generator (None: the default one of x's device), or
    a tuple of generators, one per sample; drawn in `dtype`."""

    def __init__(self, generator=None, dtype: torch.dtype = torch.float32):
        if isinstance(generator, (list, tuple)):
            generators = tuple(generator)
            if not generators or not all(isinstance(g, torch.Generator) for g in generators):
                raise TypeError("generator must be a torch.Generator or a non-empty list of them (one per sample)")
            devices = {g.device for g in generators}
            if len(devices) > 1:
                raise ValueError(f"the generators of a list must share one device, got {sorted(str(d) for d in devices)}")
            self.generator, self.generators = None, generators
        elif generator is None or isinstance(generator, torch.Generator):
            self.generator, self.generators = generator, None
        else:
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"noise_dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.dtype = dtype

    @classmethod
    def of(cls, generator, noise_dtype=None) -> "NoiseStream":
        """A sampler's `generator` argument (None, a generator, a list of them, or a stream) as a stream."""
        if isinstance(generator, NoiseStream):
            return generator
        return cls(generator, torch.float32 if noise_dtype is None else noise_dtype)

    @property
    def device(self) -> Optional[torch.device]:
        """The device the draws are made on (None: x's)."""
        if self.generators is not None:
            return self.generators[0].device
        return None if self.generator is None else self.generator.device

    @property
    def plain(self) -> bool:
        """One generator (or none) drawing float32: the reference's stream as torch.randn(x.shape)."""
        return self.generators is None and self.dtype == torch.float32

    def check_batch(self, batch: int) -> None:
        if self.generators is not None and len(self.generators) != batch:
            raise ValueError(f"got a list of {len(self.generators)} generators for a batch of {batch}; pass one per sample (or one generator)")

    def draw_into(self, out: torch.Tensor) -> torch.Tensor:
        """One draw of the stream into `out` (contiguous, on self.device, in self.dtype)."""
        if self.generators is None:
            return torch.randn(out.shape, generator=self.generator, dtype=out.dtype, device=out.device, out=out)
        for i, g in enumerate(self.generators):
            torch.randn((1, *out.shape[1:]), generator=g, dtype=out.dtype, device=out.device, out=out[i : i + 1])
        return out

    def draw(self, shape, device: torch.device) -> torch.Tensor:
        """One draw of `shape` as a new float32 tensor on `device`."""
        buffer = torch.empty(tuple(shape), dtype=self.dtype, device=self.device or device)
        return self.draw_into(buffer).to(device=device, dtype=torch.float32)

    def generator_or_default(self, device: torch.device) -> torch.Generator:
        if self.generators is not None:
            raise ValueError("a list of generators cannot seed one in-kernel noise stream (fast_rng); pass one generator")
        return generator_or_default(self.generator, device)


def initial_noise(model, x_T, batch_size, generator, shape, device, dtype) -> torch.Tensor:
    """x_T as given (checked), or drawn: torch.randn((batch_size, *shape), generator) in float32
    (generator: a generator, a list of them or a NoiseStream)."""
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
    stream = NoiseStream.of(generator)
    stream.check_batch(batch_size)
    return stream.draw((batch_size, *shp), device).to(dtype or torch.float32)


def noise_like(x: torch.Tensor, stream: NoiseStream) -> torch.Tensor:
    """One draw of the documented noise stream: torch.randn of x's shape, float32 on x's device."""
    return stream.draw(x.shape, x.device)


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
