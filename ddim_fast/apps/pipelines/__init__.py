"""A diffusers pipeline in, a fast pipeline out: `ddim_fast.accelerate(pipe)`.

    import ddim_fast
    fast = ddim_fast.accelerate(pipe)             # DDIMPipeline, StableDiffusionPipeline (and Img2Img), StableDiffusionXLPipeline
    images = fast("a cat", num_inference_steps=50, generator=g).images

The fast pipeline's call takes the pipeline's own arguments and returns what `pipe(...)`
returns. Around the denoising loop it runs the pipeline's own steps, with the pipeline's
methods on its components (prompt encoding, set_timesteps, the initial latents, the VAE
decode, the safety checker, the post-processing); the loop itself is a FastSampler's with
the solver of pipe.scheduler (DDIM, DPM-Solver++(2M) with or without Karras sigmas, Euler,
Euler ancestral, LCM: core/diffusers_config.py), fused steps, guidance inside the step, on
CUDA a captured graph. `pipe` is not changed.

The same images: x_T is the pipeline's own (its randn_tensor times init_noise_sigma; the
Euler schedulers' latents x sqrt(1 + σ²) are brought into the sampler's frame and back:
core.frame_scales), and the step noise is drawn as the scheduler's step draws it:
one torch.randn of the latents' shape per step that draws (DDIM for η > 0, Euler a, LCM but
at its last step) from the same generator (or, for a list, one per sample from each), in
the UNet's dtype. Where diffusers draws at a step that adds no noise (the last one), the
draw is made after the loop and dropped, so a generator leaves the call in the same state.

Falls back: an argument this does not cover (callback_on_step_end, ip_adapter_image,
timesteps, sigmas, denoising_end, cross_attention_kwargs, ...), an η outside [0, 1] with
DDIM, a guidance_rescale above 1, a UNet with a guidance embedding (time_cond_proj_dim), an
offloaded UNet (enable_model_cpu_offload, sequential or group offloading), a scheduler
option the solvers do not compute (thresholding, rescale_betas_zero_snr, SDE variants, ...),
image to image with a scheduler other than DDIM, or a grid that DDIMScheduler leaves (it
steps from t to t − T // S: off its own "trailing" grid when S does not divide T, off its
"linspace" grid for every 1 < S < T) make the call run `pipe(...)` itself, with one warning
that names the reason. With fast_rng=True the step noise is the kernel's own (other images
than the pipeline's where the scheduler draws noise).

Weights: the prepared UNet holds copies of some weights (channels_last convolutions, a
cast dtype, time tables; for SD its PEFT LoRA layers folded into plain ones, so a UNet with
LoRA adapters runs lean). Before each call a fingerprint of pipe.unet (its modules, their
plain attributes such as LoRA scales and active adapters, every tensor's storage and
version, and with check_weights=True each tensor's norm) is compared with the last one; on
a change the lean SD UNet takes the new weights in place (FastSampler.refresh_weights: the
samplers, compiled code and captured graphs are kept), and any other prepared model, or one
whose structure changed, is made anew with new samplers. So load_lora_weights,
set_adapters, fuse_lora or a training step on pipe.unet give fresh images.
"""

from __future__ import annotations

import sys

from .core import SUPPORTED_SCHEDULERS, WeightsWatch, check_scheduler
from .ddim import FastDDIMPipeline
from .stable_diffusion import FastStableDiffusionImg2ImgPipeline, FastStableDiffusionPipeline
from .stable_diffusion_xl import FastStableDiffusionXLPipeline

__all__ = [
    "accelerate", "FastDDIMPipeline", "FastStableDiffusionPipeline", "FastStableDiffusionImg2ImgPipeline", "FastStableDiffusionXLPipeline",
    "SUPPORTED_PIPELINES", "SUPPORTED_SCHEDULERS", "WeightsWatch",
]  # fmt: skip

SUPPORTED_PIPELINES = ("DDIMPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline")


def accelerate(pipe, *, check_weights: bool = True, **options):
    """A fast pipeline for `pipe`, a diffusers DDIMPipeline (with a DDIMScheduler),
    StableDiffusionPipeline or StableDiffusionImg2ImgPipeline (SD 1.x / 2.x) or
    StableDiffusionXLPipeline with one of SUPPORTED_SCHEDULERS; it shares pipe's components and
    leaves pipe as it is.

    options: FastSampler's engine and model options (dtype, compile, cuda_graph, graph_mode,
    channels_last, fuse, lean, backend, graph_cache_size, fast_rng); steps, η, the solver and
    the schedule come from each call and from pipe.scheduler. check_weights: also compare the
    norms of pipe.unet's tensors before each call (one read of the weights), which sees an
    in-place change through .data (PEFT's fuse_lora); False checks storage and versions only.
    """
    diffusers = sys.modules.get("diffusers")
    if diffusers is None or not isinstance(pipe, diffusers.DiffusionPipeline):
        raise TypeError(f"accelerate takes a diffusers pipeline ({', '.join(SUPPORTED_PIPELINES)}), got {type(pipe).__name__}")
    kind = type(pipe).__name__
    if kind not in _PIPELINES:
        raise TypeError(f"accelerate supports {', '.join(SUPPORTED_PIPELINES)}, got {kind}; for another pipeline, run its unet through FastSampler")
    algorithm = sorted(set(options) & {"steps", "eta", "skip", "clip_x0", "prediction", "steps_offset", "use_clipped_model_output", "solver", "sigmas"})
    if algorithm:
        raise TypeError(f"accelerate takes the sampling algorithm from the pipeline and each call, not as options: {', '.join(algorithm)}")
    check_scheduler(pipe.scheduler, _PIPELINES[kind].schedulers)
    return _PIPELINES[kind](pipe, options, check_weights)


_PIPELINES = {
    "DDIMPipeline": FastDDIMPipeline,
    "StableDiffusionPipeline": FastStableDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": FastStableDiffusionImg2ImgPipeline,
    "StableDiffusionXLPipeline": FastStableDiffusionXLPipeline,
}
