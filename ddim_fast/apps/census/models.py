"""The models the op census runs on (python -m ddim_fast.apps.census.opcount), full size and built
under a FakeTensorMode: shapes and dtypes, no data, nothing allocated or downloaded.

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    case = fake_case("sd15", mode=mode, dtype=torch.bfloat16, batch=1, guided=True)
    census_per_step(lambda s: FastSampler(case.model, case.schedule, steps=s, dtype=...), case.x_T, **case.sample_kwargs)

Random weights (the census counts shapes, not values): "sd15" is diffusers'
UNet2DConditionModel with Stable Diffusion 1.5's config (860M parameters, 64x64 latents,
a 77x768 text context), "digits" (and its class-conditional twin, when guided) the
embedded model's architecture, "cifar10" / "celeba" / "lsun" the official DDIM configs.
"""

from __future__ import annotations

import dataclasses

import torch

from ...core.schedule import Schedule
from ...models.presets import PRESETS
from ...models.unet import UNet

# SD-1.5's UNet (runwayml/stable-diffusion-v1-5's unet/config.json, diffusers' defaults for
# the rest); tests/tiny_pipelines builds its SD-1.5-sized pipeline with it
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_CONTEXT = (77, 768)  # CLIP ViT-L/14's text tokens and width
SD15_GUIDANCE = 7.5  # the SD pipelines' default guidance scale
DIGITS_GUIDANCE = 2.0
MODELS = ("sd15", "digits", "cifar10", "celeba", "lsun")


@dataclasses.dataclass
class CensusCase:
    """A model with its input: what one census samples."""

    model: torch.nn.Module
    schedule: Schedule
    x_T: torch.Tensor
    sample_kwargs: dict  # model_kwargs, guidance_scale, uncond_kwargs of sample()
    description: str


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The module with its floating-point parameters and buffers in `dtype`, replaced one by
    one: Module.to swaps a FakeTensor parameter in place (torch.utils.swap_tensors), which
    fails while the fake mode holds a weak reference to it."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    return model


def _digits_config(conditional: bool) -> dict:
    from ..pretrained import pretrained_info

    config = pretrained_info("digits-cond" if conditional else "digits")["config"]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _recipe(name: str, guided: bool) -> tuple:
    """(a function making the model in fp32, x_T's shape without the batch, the keyword of
    its conditioning or None, the guidance scale). Made outside the fake mode: the digits
    config is read from the package's file."""
    if name == "sd15":
        from diffusers import UNet2DConditionModel

        latent = (SD15_UNET["in_channels"], SD15_UNET["sample_size"], SD15_UNET["sample_size"])
        return lambda: UNet2DConditionModel(**SD15_UNET), latent, "encoder_hidden_states", SD15_GUIDANCE
    if name == "digits":
        config = _digits_config(conditional=guided)
        key = "class_labels" if guided else None
        return lambda: UNet(**config), (config["in_channels"], config["resolution"], config["resolution"]), key, DIGITS_GUIDANCE
    if name in PRESETS:
        config = PRESETS[name]
        return lambda: UNet(**config), (config["in_channels"], config["resolution"], config["resolution"]), None, None
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def _conditions(key: str, batch: int) -> tuple:
    """(model_kwargs, uncond_kwargs): a text context (zeros for the empty prompt's stand-in) or
    labels (the null label 10 unconditioned)."""
    if key == "encoder_hidden_states":
        return {key: torch.randn(batch, *SD15_CONTEXT)}, {key: torch.zeros(batch, *SD15_CONTEXT)}
    return {key: torch.zeros(batch, dtype=torch.long)}, {key: torch.full((batch,), 10, dtype=torch.long)}


def fake_case(name: str, *, mode, dtype: torch.dtype, batch: int = 1, guided: bool = True, lean_refused: bool = False) -> CensusCase:
    """The model `name` and its input built under the FakeTensorMode `mode`, the model's
    parameters in the sampling dtype `dtype` (so that no sampler casts a fake model with
    Module.to, see cast_parameters), in eval mode. guided: classifier-free guidance (sd15:
    scale 7.5 and a 77x768 context; digits: its class-conditional twin, scale 2); refused for
    the unconditional presets. lean_refused (sd15): a UNet the lean rewrite does not fit,
    which FastSampler runs as TabledUNet2D (as it runs one with a custom attention processor
    or LoRA layers), computing the same function."""
    make_model, shape, key, scale = _recipe(name, guided)
    if guided and key is None:
        raise ValueError(f"model {name!r} is unconditional: it cannot be guided (use --no-guided)")
    if lean_refused and name != "sd15":
        raise ValueError(f"lean_refused applies to sd15's UNet2DConditionModel, not to {name!r}")
    with mode:
        model = cast_parameters(make_model().eval(), dtype)
        if lean_refused:  # the rewrite refuses a block whose forward is replaced; this one is its own
            model.mid_block.forward = model.mid_block.forward
        x_T = torch.randn(batch, *shape)
        sample_kwargs = {}
        if guided:
            cond, uncond = _conditions(key, batch)
            sample_kwargs = dict(model_kwargs=cond, guidance_scale=scale, uncond_kwargs=uncond)
        elif key == "encoder_hidden_states":  # SD always takes a context
            sample_kwargs = dict(model_kwargs=_conditions(key, batch)[0])
    parameters = sum(p.numel() for p in model.parameters())
    guidance = f", guided (scale {scale:g})" if guided else ""
    description = f"{name}: {type(model).__name__}, {parameters / 1e6:.0f}M parameters, x_T {tuple(x_T.shape)}{guidance}"
    return CensusCase(model=model, schedule=Schedule.linear(), x_T=x_T, sample_kwargs=sample_kwargs, description=description)


__all__ = ["SD15_UNET", "MODELS", "CensusCase", "cast_parameters", "fake_case"]
