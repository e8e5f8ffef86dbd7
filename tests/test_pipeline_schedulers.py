"""ddim_fast.accelerate(pipe) with the schedulers and pipelines users run: every scheduler it
covers (DDIM, DPM++ 2M, DPM++ 2M Karras, Euler, Euler a, LCM; each made as users make it,
Scheduler.from_config(pipe.scheduler.config)) on SD-1.x, SD-2.x (v-prediction, linear
projections) and SDXL, guided and not, with negative prompts, several images per prompt, a
CPU generator and a list of them; the eager loop and the captured loop's own code
(cuda_graph="emulate"). `fast(...)` must give `pipe(...)`'s images to 1e-4 and leave the
generators as `pipe(...)` does. Tiny random-weight pipelines (tests/tiny_pipelines.py), fp32
on the CPU."""

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the text encoders and the tokenizers

import ddim_fast  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .conftest import requires_triton_interpreter  # noqa: E402
from .tiny_pipelines import sd_pipeline, sdxl_pipeline  # noqa: E402

TOL = 1e-4
STEPS = 4
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
ENGINES = [pytest.param({}, id="eager"), pytest.param({"cuda_graph": "emulate"}, id="emulated", marks=requires_triton_interpreter)]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The three pipelines, each with the scheduler config it was made with."""
    made = {
        "sd1": sd_pipeline(str(tmp_path_factory.mktemp("sd1"))),
        "sd2": sd_pipeline(str(tmp_path_factory.mktemp("sd2")), seed=3, prediction_type="v_prediction", linear_projection=True),
        "sdxl": sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl"))),
    }
    return {name: (pipe, pipe.scheduler) for name, pipe in made.items()}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _calls() -> list:
    """(the call's arguments, its generator seeds): guided, with negative prompts, two images
    per prompt, guidance_rescale and a list of generators; and one prompt without guidance,
    with one CPU generator."""
    guided = dict(prompt=["a cat", "a dog"], negative_prompt=["ugly", "blurry"], num_images_per_prompt=2, guidance_scale=7.5, guidance_rescale=0.7)
    plain = dict(prompt="a red car", guidance_scale=1.0)
    return [(guided, [11, 12, 13, 14]), (plain, 5)]


def _generators(seeds):
    return [_gen(s) for s in seeds] if isinstance(seeds, list) else _gen(seeds)


def _states(generators) -> list:
    return [g.get_state() for g in (generators if isinstance(generators, list) else [generators])]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("model", ["sd1", "sd2", "sdxl"])
def test_accelerate_gives_the_pipelines_images_with_its_scheduler(pipes, model, scheduler, engine):
    pipe, original = pipes[model]
    cls, extra = SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(original.config, **extra)
    try:
        fast = ddim_fast.accelerate(pipe, **engine)
        for kwargs, seeds in _calls():
            ref_gens, fast_gens = _generators(seeds), _generators(seeds)
            ref = pipe(**kwargs, num_inference_steps=STEPS, generator=ref_gens, output_type="np").images
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # no fallback to pipe(...)
                out = fast(**kwargs, num_inference_steps=STEPS, generator=fast_gens, output_type="np").images
            assert out.shape == ref.shape
            assert np.abs(out - ref).max() < TOL, (kwargs["prompt"], np.abs(out - ref).max())
            assert all(torch.equal(a, b) for a, b in zip(_states(ref_gens), _states(fast_gens)))
        assert fast.sampler.lean_note is None  # the lean SD UNet ran
    finally:
        pipe.scheduler = original


def test_the_solver_comes_from_the_scheduler(pipes):
    """Each scheduler runs its own solver (the images differ between them), and the solver's
    options follow the scheduler's config."""
    pipe, original = pipes["sd1"]
    fast = ddim_fast.accelerate(pipe)
    seen = {}
    try:
        for name, (cls, extra) in SCHEDULERS.items():
            pipe.scheduler = cls.from_config(original.config, **extra)
            seen[name] = fast("a cat", num_inference_steps=STEPS, generator=_gen(0), output_type="np").images
            sampler = next(reversed(fast._samplers.values()))  # the one this call used
            assert sampler.options.solver == {"dpmpp_2m_karras": "dpmpp_2m", "euler_a": "euler_ancestral"}.get(name, name)
            assert (sampler.options.sigmas == "karras") == (name == "dpmpp_2m_karras")
    finally:
        pipe.scheduler = original
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(seen[a] - seen[b]).max() > 1e-2, (a, b)


def test_eta_goes_to_ddim_alone_as_the_pipelines_pass_it(pipes):
    """The pipelines pass eta to a scheduler whose step takes it (DDIM); Euler ancestral draws
    its own noise whatever eta says, and an eta outside [0, 1] is no reason to fall back there."""
    pipe, original = pipes["sd1"]
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        fast = ddim_fast.accelerate(pipe)
        ref = pipe("a cat", num_inference_steps=STEPS, eta=3.0, generator=_gen(0), output_type="np").images
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            out = fast("a cat", num_inference_steps=STEPS, eta=3.0, generator=_gen(0), output_type="np").images
        assert np.abs(out - ref).max() < TOL
    finally:
        pipe.scheduler = original


def test_schedulers_and_options_it_does_not_run_are_refused_or_fall_back_by_name(pipes):
    pipe, original = pipes["sd1"]
    try:
        for cls in (PNDMScheduler, UniPCMultistepScheduler):
            pipe.scheduler = cls.from_config(original.config)
            with pytest.raises(ValueError, match=rf"{cls.__name__}.*DDIMScheduler\.from_config"):
                ddim_fast.accelerate(pipe)
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        fast = ddim_fast.accelerate(pipe)
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config, interpolation_type="log_linear")
        with pytest.warns(UserWarning, match="interpolation_type='log_linear'.*runs the original"):
            fast("a cat", num_inference_steps=STEPS, output_type="np")
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="sde-dpmsolver++")
        with pytest.warns(UserWarning, match="algorithm_type='sde-dpmsolver\\+\\+'"):
            fast("a cat", num_inference_steps=STEPS, output_type="np")
        pipe.scheduler = UniPCMultistepScheduler.from_config(original.config)  # switched after accelerate
        with pytest.raises(ValueError, match="UniPCMultistepScheduler"):
            fast("a cat", num_inference_steps=STEPS)
    finally:
        pipe.scheduler = original


def test_sdxl_takes_its_own_arguments(pipes):
    """SDXL's second prompt, its size conditioning and negative size conditioning, pooled
    embeddings given by the caller, and latent output."""
    pipe, _ = pipes["sdxl"]
    fast = ddim_fast.accelerate(pipe)
    embeds = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="ugly")
    calls = [
        dict(prompt="a cat", prompt_2="a photo", negative_prompt="ugly", negative_prompt_2="dark", original_size=(24, 24), crops_coords_top_left=(2, 4), target_size=(16, 16)),
        dict(prompt="a cat", negative_original_size=(8, 8), negative_crops_coords_top_left=(0, 2), negative_target_size=(8, 8), num_images_per_prompt=2),
        dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=embeds[2], negative_pooled_prompt_embeds=embeds[3]),
        dict(prompt="a cat", height=24, width=16),
    ]
    for kwargs in calls:
        ref = pipe(**kwargs, num_inference_steps=STEPS, generator=_gen(0), output_type="np").images
        out = fast(**kwargs, num_inference_steps=STEPS, generator=_gen(0), output_type="np").images
        assert np.abs(out - ref).max() < TOL, kwargs
    latent = fast("a cat", num_inference_steps=STEPS, generator=_gen(0), output_type="latent").images
    ref = pipe("a cat", num_inference_steps=STEPS, generator=_gen(0), output_type="latent").images
    assert (latent - ref).abs().max() < TOL * (1 + ref.abs().max())
    pil = fast("a cat", num_inference_steps=STEPS, generator=_gen(0), return_dict=False)
    assert isinstance(pil, tuple) and pil[0][0].size == (16, 16)


def test_image_to_image_with_another_scheduler_falls_back_by_name(pipes):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, original = pipes["sd1"]
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = EulerDiscreteScheduler.from_config(original.config)
    fast = ddim_fast.accelerate(img2img)
    image = torch.rand(1, 3, 16, 16, generator=_gen(1))
    with pytest.warns(UserWarning, match="image to image with a EulerDiscreteScheduler is not covered"):
        out = fast("a cat", image=image, strength=0.6, num_inference_steps=STEPS, generator=_gen(0), output_type="np").images
    ref = img2img("a cat", image=image, strength=0.6, num_inference_steps=STEPS, generator=_gen(0), output_type="np").images
    assert np.abs(out - ref).max() < TOL
