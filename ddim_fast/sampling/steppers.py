"""The eager loop's step functions (FastSampler._eager): step(i, model_output, noisy, x0_out)
updates x in place with step i of a plan, through the fused op (ops.step: the native CPU or
CUDA kernel, or PyTorch) or the captured loop's Triton launch, with the noise of the
reference's stream and a multistep solver's history kept in a buffer made once."""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..core.plan import StepPlan
from .conditioning import GuidanceBuffers
from .noise import NoiseStream, philox_seed
from .spec import StepSpec, history_buffer


def noise_drawer(plan: StepPlan, x, stream: NoiseStream):
    """draw(): the next draw of the reference's stream, torch.randn(x.shape) from the
    stream, as float32 in x's layout (what the fused step reads with x's flat offsets);
    None when the plan draws no noise. Buffers made once: no allocation per step."""
    if not plan.noisy_steps:
        return None
    z = torch.empty_like(x, dtype=torch.float32)
    draw_device = stream.device or x.device
    if draw_device == x.device and z.is_contiguous() and stream.dtype == torch.float32:
        return lambda: stream.draw_into(z)  # noqa: E731
    # NCHW on the generator's device in the stream's dtype (as ReferenceSampler draws), then
    # one copy into x's layout as float32
    z_draw = torch.empty(x.shape, dtype=stream.dtype, device=draw_device)
    return lambda: z.copy_(stream.draw_into(z_draw))  # noqa: E731

def op_stepper(spec: StepSpec, x, stream: NoiseStream, guide: Optional[GuidanceBuffers], backend: Optional[str]):
    """step(i, model_output, noisy, x0_out): the fused op, noise from the reference's stream.

    guide: a guided loop's buffers; model_output is then the doubled batch's (uncond, cond)."""
    plan = spec.plan
    rows = [plan.row(i) for i in range(plan.steps)]
    clip, clipped_eps, prediction = spec.clip, spec.clipped_eps, spec.prediction
    draw = noise_drawer(plan, x, stream)
    history = history_buffer(spec, x)
    n = x.shape[0]

    def step(i, out, noisy, x0_out):
        noise = draw() if noisy else None
        if guide is None:
            ops.step(x, out, rows[i], noise, clip, prediction, clipped_eps, x, x0_out, backend=backend, history=history)
        elif guide.rescale:  # per-sample statistics first: the combine cannot be fused
            ops.step(x, guide.rescaled(out), rows[i], noise, clip, prediction, clipped_eps, x, x0_out, backend=backend, history=history)
        else:
            ops.step(x, out[:n], rows[i], noise, clip, prediction, clipped_eps, x, x0_out, backend=backend, cond=out[n:], guidance=guide.guidance, history=history)

    return step

def kernel_stepper(spec: StepSpec, x, stream: NoiseStream, guide: Optional[GuidanceBuffers]):
    """step(i, ...): the Triton step kernel reading row i of a coefficient table made once on
    the device (the captured loop's launch, uncaptured), for fast_rng (the kernel draws the
    noise) and where the step's backend is Triton (CUDA without the native ops): the op's
    eager entry would copy a new one-row table to the device every step."""
    from ..kernels import ddim_step as tk

    plan = spec.plan
    dev = x.device
    table = torch.tensor(plan.coefs, dtype=torch.float32, device=dev)
    row = torch.zeros(1, dtype=torch.int32, device=dev)
    philox = spec.fast_rng
    seed = philox_seed(stream.generator_or_default(dev), dev) if philox else None
    draw = None if philox else noise_drawer(plan, x, stream)
    history = history_buffer(spec, x)
    n = x.shape[0]

    def step(i, out, noisy, x0_out):  # out: in x's layout (_eager sees to it)
        row.fill_(i)
        model_output, cond, w = out, None, None
        if guide is not None and guide.rescale:
            model_output = guide.rescaled(out)
        elif guide is not None:
            model_output, cond, w = out[:n], out[n:], guide.w
        tk.launch(
            x,
            model_output,
            table,
            row,
            x,
            prediction=spec.prediction,
            clip=spec.clip,
            clipped_eps=spec.clipped_eps,
            noise=draw() if (noisy and draw is not None) else None,
            seed=seed if (noisy and philox) else None,
            has_xt=spec.has_xt,
            x0_out=x0_out,
            cond=cond,
            guidance=w,
            history=history,
        )

    return step
