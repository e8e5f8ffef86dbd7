"""The sampling layer: ReferenceSampler (the official eager loop), FastSampler (fused ops,
static buffers, a captured CUDA graph) and what they share. It imports the models, ops,
kernels and base layers only.

    reference  ReferenceSampler, step for step the official generalized_steps / ddpm_steps
    fast       FastSampler
    graph      the captured loop: static buffers, device-side step counter, graph cache
    common     the result type, the model call and the input checks
    noise      x_T and step noise, seeded noise per sample index, slerp
"""

from .common import SamplerOutput
from .fast import FastSampler
from .reference import ReferenceSampler

__all__ = ["FastSampler", "ReferenceSampler", "SamplerOutput"]
