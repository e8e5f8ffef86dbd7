"""A diffusers pipeline in, a fast pipeline out: `ddim_fast.accelerate(pipe)`.

    import ddim_fast
    fast = ddim_fast.accelerate(pipe)             # a DDIMPipeline, StableDiffusionPipeline or its Img2Img twin
    images = fast("a cat", num_inference_steps=50, generator=g).images

The fast pipeline's call takes the pipeline's own arguments and returns what `pipe(...)`
returns. Around the denoising loop it runs the pipeline's own steps, with the pipeline's
methods on its components (prompt encoding, the initial latents, the VAE decode, the safety
checker, the post-processing); the loop itself is a FastSampler's (fused steps, guidance
inside the step, on CUDA a captured graph). `pipe` is not changed.

The same images: x_T is the pipeline's own (its randn_tensor), and the step noise is drawn
as DDIMScheduler.step draws it: for η > 0 one torch.randn of the latents' shape per step
from the same generator (or, for a list, one per sample from each), in the UNet's dtype.
Where diffusers draws at a step whose σ is 0 (the last one, with set_alpha_to_one), the
draw is made after the loop and dropped, so a generator leaves the call in the same state.

Falls back: an argument this does not cover (callback_on_step_end, ip_adapter_image,
timesteps, sigmas, cross_attention_kwargs, ...), an η outside [0, 1], a guidance_rescale
above 1, a UNet with a guidance embedding (time_cond_proj_dim), an offloaded UNet
(enable_model_cpu_offload, sequential or group offloading), a DDIMScheduler option the
samplers do not implement (thresholding, rescale_betas_zero_snr) or a grid that
DDIMScheduler leaves (it steps from t to t − T // S: off its own "trailing" grid when S does
not divide T, off its "linspace" grid for every 1 < S < T) make the call run `pipe(...)`
itself, with one warning that names the reason. With fast_rng=True the step noise is the
kernel's own (other images than the pipeline's for η > 0).

Weights: the prepared UNet holds copies of some weights (channels_last convolutions, a
cast dtype, time tables). Before each call a fingerprint of pipe.unet (its modules, their
plain attributes such as LoRA scales, every tensor's storage and version, and with
check_weights=True each tensor's norm) is compared with the last one; on a change the
samplers are made anew, so load_lora_weights, fuse_lora or a training step on pipe.unet
give fresh images.
"""

from __future__ import annotations

import sys

from ..sampling import FastSampler
from ..sampling.noise import NoiseStream
from .pipeline_core import SUPPORTED_SCHEDULERS, FastPipeline, WeightsWatch, check_scheduler
from .stable_diffusion import FastStableDiffusionImg2ImgPipeline, FastStableDiffusionPipeline

__all__ = ["accelerate", "FastDDIMPipeline", "FastStableDiffusionPipeline", "FastStableDiffusionImg2ImgPipeline", "SUPPORTED_PIPELINES", "SUPPORTED_SCHEDULERS", "WeightsWatch"]

SUPPORTED_PIPELINES = ("DDIMPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


def accelerate(pipe, *, check_weights: bool = True, **options):
    """A fast pipeline for `pipe`, a diffusers DDIMPipeline, StableDiffusionPipeline or
    StableDiffusionImg2ImgPipeline (SD 1.x / 2.x) with a DDIMScheduler; it shares pipe's
    components and leaves pipe as it is.

    options: FastSampler's engine and model options (dtype, compile, cuda_graph, graph_mode,
    channels_last, fuse, lean, backend, graph_cache_size, fast_rng); steps, η and the
    schedule come from each call and from pipe.scheduler. check_weights: also compare the
    norms of pipe.unet's tensors before each call (one read of the weights), which sees an
    in-place change through .data (PEFT's fuse_lora); False checks storage and versions only.
    """
    diffusers = sys.modules.get("diffusers")
    if diffusers is None or not isinstance(pipe, diffusers.DiffusionPipeline):
        raise TypeError(f"accelerate takes a diffusers pipeline ({', '.join(SUPPORTED_PIPELINES)}), got {type(pipe).__name__}")
    kind = type(pipe).__name__
    if kind not in _PIPELINES:
        raise TypeError(f"accelerate supports {', '.join(SUPPORTED_PIPELINES)}, got {kind}; for another pipeline, run its unet through FastSampler")
    algorithm = sorted(set(options) & {"steps", "eta", "skip", "clip_x0", "prediction", "steps_offset", "use_clipped_model_output"})
    if algorithm:
        raise TypeError(f"accelerate takes the sampling algorithm from the pipeline and each call, not as options: {', '.join(algorithm)}")
    check_scheduler(pipe.scheduler)
    return _PIPELINES[kind](pipe, options, check_weights)


class FastDDIMPipeline(FastPipeline):
    """accelerate(DDIMPipeline): its call, with FastSampler's loop."""

    covered = ("batch_size", "generator", "eta", "num_inference_steps", "use_clipped_model_output", "output_type", "return_dict")

    def _generate(self, sampler: FastSampler, values: dict):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        batch_size, generator = values["batch_size"], values["generator"]
        size = pipe.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, pipe.unet.config.in_channels, height, width)
        if isinstance(generator, list):  # before randn_tensor, which would index past the list
            NoiseStream(generator).check_batch(batch_size)
        x_T = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=pipe.unet.dtype)
        image = self._sample(sampler, x_T, generator, values["eta"]).to(pipe.unet.dtype)
        image = (image / 2 + 0.5).clamp(0, 1)
        output_type = values["output_type"]
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()
        if not values["return_dict"]:
            return (image,)
        return ImagePipelineOutput(images=image)


_PIPELINES = {
    "DDIMPipeline": FastDDIMPipeline,
    "StableDiffusionPipeline": FastStableDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": FastStableDiffusionImg2ImgPipeline,
}
