"""accelerate(DDIMPipeline): the unconditional pipeline's own call with FastSampler's loop."""

from __future__ import annotations

from ...sampling import FastSampler
from ...sampling.noise import NoiseStream
from .core import FastPipeline


class FastDDIMPipeline(FastPipeline):
    """accelerate(DDIMPipeline): its call, with FastSampler's loop."""

    covered = ("batch_size", "generator", "eta", "num_inference_steps", "use_clipped_model_output", "output_type", "return_dict")
    schedulers = ("DDIMScheduler",)  # its own call steps with DDIMScheduler's arguments

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
        image = self._sample(sampler, x_T, generator).to(pipe.unet.dtype)
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
