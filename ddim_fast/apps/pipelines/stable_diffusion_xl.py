"""accelerate(StableDiffusionXLPipeline): the pipeline's own call with FastSampler's loop.

Around the loop it runs the pipeline's own steps: encode_prompt with both text encoders (the
prompt embeddings and the pooled ones), the added time ids (_get_add_time_ids, the negative
ones when given), prepare_latents, and the VAE decode as the pipeline ends it (upcast for an
fp16 VAE that asks for it, the latents' mean and std when the VAE has them, the watermark).
The UNet gets encoder_hidden_states and added_cond_kwargs={"text_embeds", "time_ids"}, which
the lean SD UNet turns into a per-run table with the time embeddings (models/sd_lean.py)."""

from __future__ import annotations

from typing import Optional

import torch

from ...sampling import FastSampler
from .core import FastPipeline, guided_call_refusal, prompt_batch_size


class FastStableDiffusionXLPipeline(FastPipeline):
    """accelerate(StableDiffusionXLPipeline): its call, with FastSampler's loop."""

    covered = (
        "prompt", "prompt_2", "height", "width", "num_inference_steps", "guidance_scale", "negative_prompt",
        "negative_prompt_2", "num_images_per_prompt", "eta", "generator", "latents", "prompt_embeds",
        "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "output_type", "return_dict",
        "guidance_rescale", "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
        "negative_crops_coords_top_left", "negative_target_size", "clip_skip",
    )  # fmt: skip

    def _uncovered(self, values: dict, given: set, extra: dict) -> Optional[str]:
        return guided_call_refusal(self.pipe, values) or super()._uncovered(values, given, extra)

    def _generate(self, sampler: FastSampler, values: dict):
        pipe = self.pipe
        height = values["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        width = values["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        original_size = values["original_size"] or (height, width)
        target_size = values["target_size"] or (height, width)
        pipe.check_inputs(
            values["prompt"],
            values["prompt_2"],
            height,
            width,
            None,
            values["negative_prompt"],
            values["negative_prompt_2"],
            values["prompt_embeds"],
            values["negative_prompt_embeds"],
            values["pooled_prompt_embeds"],
            values["negative_pooled_prompt_embeds"],
            None,
            None,
            ["latents"],
        )
        prompt = values["prompt"]
        batch_size = prompt_batch_size(values)
        device = pipe._execution_device
        guided = values["guidance_scale"] > 1  # diffusers' do_classifier_free_guidance (no guidance embedding here)
        per_prompt = values["num_images_per_prompt"]
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=values["prompt_2"],
            device=device,
            num_images_per_prompt=per_prompt,
            do_classifier_free_guidance=guided,
            negative_prompt=values["negative_prompt"],
            negative_prompt_2=values["negative_prompt_2"],
            prompt_embeds=values["prompt_embeds"],
            negative_prompt_embeds=values["negative_prompt_embeds"],
            pooled_prompt_embeds=values["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=values["negative_pooled_prompt_embeds"],
            lora_scale=None,
            clip_skip=values["clip_skip"],
        )
        pipe.scheduler.set_timesteps(values["num_inference_steps"], device=device)  # as the pipeline: init_noise_sigma follows it
        dtype = prompt_embeds.dtype
        generator = values["generator"]
        images = batch_size * per_prompt
        latents = pipe.prepare_latents(images, pipe.unet.config.in_channels, height, width, dtype, device, generator, values["latents"])
        projection_dim = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(original_size, values["crops_coords_top_left"], target_size, dtype=dtype, text_encoder_projection_dim=projection_dim)
        if values["negative_original_size"] is not None and values["negative_target_size"] is not None:
            negative_time_ids = pipe._get_add_time_ids(
                values["negative_original_size"],
                values["negative_crops_coords_top_left"],
                values["negative_target_size"],
                dtype=dtype,
                text_encoder_projection_dim=projection_dim,
            )
        else:
            negative_time_ids = time_ids
        conditioning = self._conditioning(prompt_embeds, pooled, time_ids, negative_prompt_embeds, negative_pooled, negative_time_ids, images, guided, values)
        latents = self._sample(sampler, latents, generator, **conditioning).to(dtype)
        return self._output(latents, values)

    def _conditioning(self, embeds, pooled, time_ids, negative_embeds, negative_pooled, negative_time_ids, images: int, guided: bool, values: dict) -> dict:
        """The sampler's conditioning arguments, the UNet's inputs as the pipeline builds them:
        guided, its doubled time ids are [negative, positive] repeated `images` times, whose
        first half the unconditional call gets (the rows alternate when the negative ids
        differ: diffusers' own layout, kept)."""
        device = self.pipe._execution_device

        def kwargs(hidden, text_embeds, ids):
            return {"encoder_hidden_states": hidden.to(device), "added_cond_kwargs": {"text_embeds": text_embeds.to(device), "time_ids": ids}}

        if not guided:
            return dict(model_kwargs=kwargs(embeds, pooled, time_ids.to(device).repeat(images, 1)))
        both_ids = torch.cat([negative_time_ids, time_ids], dim=0).to(device).repeat(images, 1)
        rescale = values.get("guidance_rescale", 0.0)
        return dict(
            model_kwargs=kwargs(embeds, pooled, both_ids[images:]),
            uncond_kwargs=kwargs(negative_embeds, negative_pooled, both_ids[:images]),
            guidance_scale=values["guidance_scale"],
            guidance_rescale=rescale if rescale > 0 else None,
        )

    def _output(self, latents: torch.Tensor, values: dict):
        """The VAE decode and the post-processing, as StableDiffusionXLPipeline ends."""
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        pipe = self.pipe
        output_type = values["output_type"]
        if output_type == "latent":
            image = latents
        else:
            vae = pipe.vae
            upcast = vae.dtype == torch.float16 and vae.config.force_upcast
            if upcast:
                vae.to(dtype=torch.float32)
                latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents.to(_execution_device(vae)), return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
            if getattr(pipe, "watermark", None) is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        if not values["return_dict"]:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)


def _execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` runs (diffusers' get_module_execution_device where it has one)."""
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:
        return next(module.parameters()).device
    return get_module_execution_device(module)
