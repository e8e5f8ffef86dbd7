"""accelerate(StableDiffusionPipeline) and accelerate(StableDiffusionImg2ImgPipeline): the
pipelines' own calls (SD 1.x / 2.x) with FastSampler's loop, guided inside the step, with
the solver of pipe.scheduler (DDIM, DPM-Solver++(2M) with or without Karras sigmas, Euler,
Euler ancestral, LCM; image to image with DDIM).

Image to image: with strength s the pipeline runs the last min(int(S·s), S) steps of its
S-step grid from the encoded image noised to the first of them (its prepare_latents: the
VAE's posterior sample, then the noise, from the same generator); the sampler runs those
steps as an explicit grid, the grid's lowest points."""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ...sampling import FastSampler
from .core import FastPipeline, guided_call_refusal, prompt_batch_size


class FastStableDiffusionPipeline(FastPipeline):
    """accelerate(StableDiffusionPipeline): its call, with FastSampler's loop."""

    covered = (
        "prompt", "height", "width", "num_inference_steps", "guidance_scale", "negative_prompt", "num_images_per_prompt",
        "eta", "generator", "latents", "prompt_embeds", "negative_prompt_embeds", "output_type", "return_dict",
        "guidance_rescale", "clip_skip",
    )  # fmt: skip

    def _uncovered(self, values: dict, given: set, extra: dict) -> Optional[str]:
        return guided_call_refusal(self.pipe, values) or super()._uncovered(values, given, extra)

    def _generate(self, sampler: FastSampler, values: dict):
        pipe = self.pipe
        height, width = values["height"], values["width"]
        if not height or not width:  # as the pipeline: both from the UNet's sample size
            size = pipe.unet.config.sample_size
            height, width = (size, size) if isinstance(size, int) else tuple(size[:2])
            height, width = height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
        pipe.check_inputs(values["prompt"], height, width, None, values["negative_prompt"], values["prompt_embeds"], values["negative_prompt_embeds"], None, None, ["latents"])
        batch_size, conditioning, dtype = self._prompts(values)
        device = pipe._execution_device
        generator = values["generator"]
        pipe.scheduler.set_timesteps(values["num_inference_steps"], device=device)  # as the pipeline: init_noise_sigma follows it
        latents = pipe.prepare_latents(batch_size, pipe.unet.config.in_channels, height, width, dtype, device, generator, values["latents"])
        latents = self._sample(sampler, latents, generator, **conditioning).to(dtype)
        return self._output(latents, values, dtype)

    # the steps before and after the loop, as the pipelines take them ----------------------------
    def _prompts(self, values: dict) -> tuple:
        """(the batch of images, the sampler's conditioning arguments, the latents' dtype) from
        the prompts or their embeddings (the pipeline's encode_prompt)."""
        pipe = self.pipe
        prompt = values["prompt"]
        batch_size = prompt_batch_size(values)
        guidance_scale = values["guidance_scale"]
        guided = guidance_scale > 1  # diffusers' do_classifier_free_guidance (no guidance embedding here)
        per_prompt = values["num_images_per_prompt"]
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt,
            pipe._execution_device,
            per_prompt,
            guided,
            values["negative_prompt"],
            prompt_embeds=values["prompt_embeds"],
            negative_prompt_embeds=values["negative_prompt_embeds"],
            lora_scale=None,
            clip_skip=values["clip_skip"],
        )
        conditioning = dict(model_kwargs={"encoder_hidden_states": prompt_embeds})
        if guided:
            rescale = values.get("guidance_rescale", 0.0)
            conditioning.update(guidance_scale=guidance_scale, uncond_kwargs={"encoder_hidden_states": negative_prompt_embeds}, guidance_rescale=rescale if rescale > 0 else None)
        return batch_size * per_prompt, conditioning, prompt_embeds.dtype

    def _output(self, latents: torch.Tensor, values: dict, dtype: torch.dtype):
        """The VAE decode, the safety checker and the post-processing, as the pipelines end."""
        from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

        pipe = self.pipe
        output_type = values["output_type"]
        if output_type != "latent":
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=values["generator"])[0]
            image, has_nsfw_concept = pipe.run_safety_checker(image, pipe._execution_device, dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not flagged for flagged in has_nsfw_concept]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        pipe.maybe_free_model_hooks()
        if not values["return_dict"]:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)


class FastStableDiffusionImg2ImgPipeline(FastStableDiffusionPipeline):
    """accelerate(StableDiffusionImg2ImgPipeline): its call, with FastSampler's loop over the
    steps that strength leaves."""

    covered = (
        "prompt", "image", "strength", "num_inference_steps", "guidance_scale", "negative_prompt", "num_images_per_prompt",
        "eta", "generator", "prompt_embeds", "negative_prompt_embeds", "output_type", "return_dict", "clip_skip",
    )  # fmt: skip

    def _uncovered(self, values: dict, given: set, extra: dict) -> Optional[str]:
        scheduler = type(self.pipe.scheduler).__name__
        if scheduler != "DDIMScheduler":
            return f"image to image with a {scheduler} is not covered (with a DDIMScheduler it is)"
        strength = values["strength"]
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
            return f"strength={strength!r} is outside [0, 1]"  # the pipeline's own call says how
        return super()._uncovered(values, given, extra)

    def _steps_run(self, values: dict) -> Optional[int]:
        steps = values["num_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            return None  # the sampler refuses it with its own error
        return min(int(steps * values["strength"]), int(steps))  # the pipeline's get_timesteps

    def _generate(self, sampler: FastSampler, values: dict):
        pipe = self.pipe
        pipe.check_inputs(values["prompt"], values["strength"], None, values["negative_prompt"], values["prompt_embeds"], values["negative_prompt_embeds"], None, None, ["latents"])
        batch_size, conditioning, dtype = self._prompts(values)
        per_prompt = values["num_images_per_prompt"]
        device = pipe._execution_device
        generator = values["generator"]
        image = pipe.image_processor.preprocess(values["image"])
        first = torch.tensor(sampler.timesteps[:1], dtype=torch.long, device=device)
        latents = pipe.prepare_latents(image, first.repeat(batch_size), batch_size // per_prompt, per_prompt, dtype, device, generator)
        latents = self._sample(sampler, latents, generator, **conditioning).to(dtype)
        return self._output(latents, values, dtype)
