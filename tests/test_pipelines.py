"""ddim_fast.accelerate(pipe): the pipeline's own call, the same images, FastSampler's loop.

Tiny random-weight pipelines built from configs (tests/tiny_pipelines.py); fp32 on the CPU,
where `fast(...)` must return `pipe(...)`'s images to 1e-4 for every covered argument."""

import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import ddim_fast  # noqa: E402
from ddim_fast import FastSampler, ReferenceSampler, Schedule  # noqa: E402
from .conftest import requires_cuda, requires_triton_interpreter  # noqa: E402
from .tiny_pipelines import ddim_pipeline  # noqa: E402
from .tiny_pipelines import sd_pipeline as _sd_pipeline  # noqa: E402

TOL = 1e-4


def sd_pipeline(folder, **kwargs):
    pytest.importorskip("transformers")  # the text encoder and the tokenizer
    return _sd_pipeline(folder, **kwargs)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_pipeline(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def fast_sd(sd):
    return ddim_fast.accelerate(sd)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _both(pipe, fast, **kwargs):
    """(pipe's images, fast's images, whether both left their generators in one state)."""
    seed = kwargs.pop("seed", 0)
    ref_gen, fast_gen = _gen(seed), _gen(seed)
    ref = pipe(**kwargs, generator=ref_gen, output_type="np").images
    out = fast(**kwargs, generator=fast_gen, output_type="np").images
    return ref, out, torch.equal(ref_gen.get_state(), fast_gen.get_state())


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- DDIMPipeline ------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddim_pipeline_gives_the_pipelines_images(eta, clip_sample):
    pipe = ddim_pipeline(clip_sample=clip_sample)
    fast = ddim_fast.accelerate(pipe)
    ref, out, same_state = _both(pipe, fast, batch_size=3, eta=eta, num_inference_steps=10)
    assert out.shape == ref.shape == (3, 8, 8, 3) and out.dtype == ref.dtype
    assert np.abs(out - ref).max() < TOL
    assert same_state  # the draw diffusers makes at the last step (σ = 0) is made and dropped


def test_ddim_pipeline_outputs_generator_lists_and_clipped_eps():
    pipe = ddim_pipeline()
    fast = ddim_fast.accelerate(pipe)
    gens = lambda: [_gen(10 + i) for i in range(2)]  # noqa: E731
    ref = pipe(batch_size=2, generator=gens(), eta=0.5, num_inference_steps=6, use_clipped_model_output=True, output_type="pt").images
    out = fast(batch_size=2, generator=gens(), eta=0.5, num_inference_steps=6, use_clipped_model_output=True, output_type="pt").images
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape
    assert (out - ref).abs().max() < TOL
    pil = fast(batch_size=2, generator=_gen(), num_inference_steps=4)
    assert len(pil.images) == 2 and pil.images[0].size == (8, 8)
    tup = fast(batch_size=1, generator=_gen(), num_inference_steps=4, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and len(tup[0]) == 1
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        fast(batch_size=3, generator=gens(), num_inference_steps=4)


# --- StableDiffusionPipeline ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt="a cat"),
        dict(prompt=["a cat", "a dog"], negative_prompt=["ugly", "blurry"], eta=1.0),
        dict(prompt="a cat", num_images_per_prompt=2, eta=0.3),
        dict(prompt="a cat", guidance_scale=1.0, eta=1.0),  # no guidance: one model call per step
        dict(prompt="a cat", guidance_scale=7.5, guidance_rescale=0.7, eta=0.5),
        dict(prompt="a cat", height=24, width=16),
    ],
    ids=["one-prompt", "lists-negatives-eta1", "two-per-prompt", "guidance-1", "rescale", "size"],
)
def test_stable_diffusion_gives_the_pipelines_images(sd, fast_sd, kwargs):
    ref, out, same_state = _both(sd, fast_sd, num_inference_steps=8, **kwargs)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < TOL
    assert same_state


def test_clip_skip_as_the_pipeline(sd, fast_sd):
    """diffusers 0.42's clip_skip reads text_encoder.text_model, which transformers 5's
    CLIPTextModel no longer has: the pipeline's own error then, and ours the same."""
    try:
        ref = sd("a cat", clip_skip=1, num_inference_steps=4, generator=_gen(), output_type="np").images
    except AttributeError as error:
        with pytest.raises(AttributeError, match=str(error).split("'")[-2]):
            fast_sd("a cat", clip_skip=1, num_inference_steps=4, generator=_gen(), output_type="np")
        return
    out = fast_sd("a cat", clip_skip=1, num_inference_steps=4, generator=_gen(), output_type="np").images
    assert np.abs(out - ref).max() < TOL


def test_stable_diffusion_from_embeddings_latents_and_generator_lists(sd, fast_sd):
    ids = sd.tokenizer(["a red car", ""], padding="max_length", max_length=sd.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = sd.text_encoder(ids)[0]
    latents = torch.randn((2, 4, 8, 8), generator=_gen(5))
    common = dict(prompt_embeds=embeds[:1].repeat(2, 1, 1), negative_prompt_embeds=embeds[1:].repeat(2, 1, 1), latents=latents, num_inference_steps=7, eta=1.0, output_type="np")
    ref = sd(**common, generator=[_gen(1), _gen(2)]).images
    out = fast_sd(**common, generator=[_gen(1), _gen(2)]).images
    assert np.abs(out - ref).max() < TOL


def test_stable_diffusion_v_prediction_with_linear_projections(tmp_path):
    pipe = sd_pipeline(str(tmp_path), seed=3, prediction_type="v_prediction", linear_projection=True)  # SD 2.x-shaped
    ref, out, _ = _both(pipe, ddim_fast.accelerate(pipe), prompt="a cat", num_inference_steps=6, eta=0.5)
    assert np.abs(out - ref).max() < TOL


def test_stable_diffusion_outputs(sd, fast_sd):
    latent = fast_sd("a cat", num_inference_steps=3, generator=_gen(), output_type="latent")
    ref = sd("a cat", num_inference_steps=3, generator=_gen(), output_type="latent")
    assert isinstance(latent.images, torch.Tensor) and latent.images.shape == (1, 4, 8, 8)
    assert (latent.images - ref.images).abs().max() < TOL and latent.nsfw_content_detected is None
    pil = fast_sd("a cat", num_inference_steps=3, generator=_gen())
    assert len(pil.images) == 1 and pil.images[0].size == (16, 16)
    images, nsfw = fast_sd("a cat", num_inference_steps=3, generator=_gen(), return_dict=False)
    assert len(images) == 1 and nsfw is None


def test_the_pipelines_progress_bar_setting_is_kept():
    import io

    pipe = ddim_pipeline()
    fast = ddim_fast.accelerate(pipe)
    shown = io.StringIO()
    pipe.set_progress_bar_config(file=shown, disable=False, ascii=True)
    fast(batch_size=1, generator=_gen(), num_inference_steps=6, output_type="np")
    assert "6/6" in shown.getvalue()  # one update when the loop is done: no host sync inside it
    pipe.set_progress_bar_config(file=shown, disable=True)
    before = shown.getvalue()
    fast(batch_size=1, generator=_gen(), num_inference_steps=6, output_type="np")
    assert shown.getvalue() == before


# --- StableDiffusionImg2ImgPipeline --------------------------------------------------------------


@pytest.fixture(scope="module")
def img2img(sd):
    from .tiny_pipelines import img2img_pipeline

    return img2img_pipeline(sd)


def _init_image(batch=1, seed=0):
    return torch.rand((batch, 3, 16, 16), generator=_gen(seed))  # in [0, 1], as the image processor takes tensors


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strength=0.8),
        dict(strength=0.5, eta=1.0, negative_prompt="blurry"),
        dict(strength=1.0, num_images_per_prompt=2),
        dict(strength=0.6, guidance_scale=1.0, eta=0.5),
    ],
    ids=["strength-0.8", "half-eta1-negative", "full-two-per-prompt", "no-guidance"],
)
def test_image_to_image_gives_the_pipelines_images(img2img, kwargs):
    fast = ddim_fast.accelerate(img2img)
    ref, out, same_state = _both(img2img, fast, prompt="a cat", image=_init_image(), num_inference_steps=10, **kwargs)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < TOL
    assert same_state  # the VAE's posterior sample, the noise and the steps' draws, in the pipeline's order
    (sampler,) = fast._samplers.values()
    assert sampler.options.steps == min(int(10 * kwargs["strength"]), 10)


def test_image_to_image_with_a_list_of_generators_and_a_strength_that_runs_nothing(img2img):
    fast = ddim_fast.accelerate(img2img)
    common = dict(prompt=["a cat", "a dog"], image=_init_image(2), num_inference_steps=6, strength=0.7, eta=1.0, output_type="np")
    ref = img2img(**common, generator=[_gen(1), _gen(2)]).images
    out = fast(**common, generator=[_gen(1), _gen(2)]).images
    assert np.abs(out - ref).max() < TOL
    # int(4 * 0.1) = 0 steps: the pipeline's own call fails on its empty grid (diffusers 0.42: a
    # RuntimeError from an empty reshape), and so does ours, after saying why it fell back
    with pytest.warns(UserWarning, match="runs no step"), pytest.raises(RuntimeError):
        fast("a cat", image=_init_image(), num_inference_steps=4, strength=0.1, output_type="np")


# --- what falls back, what is refused ------------------------------------------------------------


def test_an_uncovered_argument_runs_the_pipeline_with_one_warning(sd, fast_sd):
    seen = []

    def on_step_end(pipe, i, t, tensors):
        seen.append(int(t))
        return tensors

    with pytest.warns(UserWarning, match="callback_on_step_end is not covered") as record:
        out = fast_sd("a cat", num_inference_steps=3, generator=_gen(), output_type="np", callback_on_step_end=on_step_end).images
    assert len([w for w in record if "ddim_fast.accelerate" in str(w.message)]) == 1
    assert len(seen) == 3  # the pipeline's own loop ran, callback and all
    ref = sd("a cat", num_inference_steps=3, generator=_gen(), output_type="np").images
    assert np.abs(out - ref).max() == 0
    calls = []
    with pytest.warns(UserWarning, match="callback, callback_steps are not covered"):  # **kwargs of the pipeline's call
        fast_sd("a cat", num_inference_steps=2, output_type="np", callback=lambda *args: calls.append(args), callback_steps=1)
    assert len(calls) == 2


def test_a_grid_diffusers_leaves_falls_back_by_name():
    from diffusers import DDIMScheduler

    pipe = ddim_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    fast = ddim_fast.accelerate(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 10 divides 1000: the grid's next point is t - 100, no fallback
        fast(batch_size=1, generator=_gen(), num_inference_steps=10, output_type="np")
    with pytest.warns(UserWarning, match="timestep_spacing='trailing' and 3 steps"):
        out = fast(batch_size=1, generator=_gen(), num_inference_steps=3, output_type="np").images
    assert np.array_equal(out, pipe(batch_size=1, generator=_gen(), num_inference_steps=3, output_type="np").images)
    with pytest.warns(UserWarning, match=r"eta=1\.5 is outside \[0, 1\]"):
        fast(batch_size=1, generator=_gen(), num_inference_steps=2, eta=1.5, output_type="np")


def test_options_the_samplers_lack_fall_back_by_name():
    from diffusers import DDIMScheduler

    pipe = ddim_pipeline()
    fast = ddim_fast.accelerate(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True)
    with pytest.warns(UserWarning, match="rescale_betas_zero_snr=True is not supported"):
        out = fast(batch_size=1, generator=_gen(), num_inference_steps=4, output_type="np").images
    assert np.array_equal(out, pipe(batch_size=1, generator=_gen(), num_inference_steps=4, output_type="np").images)
    pipe.unet._hf_hook = object()  # what accelerate's cpu_offload hooks leave on a module
    with pytest.warns(UserWarning, match="an offloaded UNet"):
        fast(batch_size=1, generator=_gen(), num_inference_steps=2, output_type="np")


def test_numpy_arguments_and_a_large_guidance_rescale(sd, fast_sd):
    ref, out, _ = _both(sd, fast_sd, prompt="a cat", num_inference_steps=np.int64(4), eta=np.float32(0.5))
    assert np.abs(out - ref).max() < TOL
    with pytest.warns(UserWarning, match="guidance_rescale=1.5 above 1"):
        fast_sd("a cat", num_inference_steps=2, guidance_rescale=1.5, output_type="np")


def test_a_scheduler_it_does_not_run_is_refused_with_the_line_that_switches_it(tmp_path):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    pipe = sd_pipeline(str(tmp_path))
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"PNDMScheduler.*DDIMScheduler\.from_config\(pipe\.scheduler\.config\)"):
        ddim_fast.accelerate(pipe)
    ddim = ddim_pipeline()
    ddim.scheduler = EulerDiscreteScheduler.from_config(ddim.scheduler.config)  # DDIMPipeline's call steps as DDIM does
    with pytest.raises(ValueError, match="EulerDiscreteScheduler; ddim_fast.accelerate runs DDIMScheduler there"):
        ddim_fast.accelerate(ddim)
    with pytest.raises(TypeError, match="DDIMPipeline, StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionXLPipeline"):
        ddim_fast.accelerate(pipe.unet)
    with pytest.raises(TypeError, match="not as options: eta, steps"):
        ddim_fast.accelerate(ddim_pipeline(), steps=10, eta=0.5)
    with pytest.raises(ValueError, match="graph_mode"):
        ddim_fast.accelerate(ddim_pipeline(), graph_mode="nope")


def test_a_scheduler_switched_after_accelerate_is_refused_at_the_call(tmp_path):
    from diffusers import PNDMScheduler

    pipe = sd_pipeline(str(tmp_path))
    fast = ddim_fast.accelerate(pipe)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="PNDMScheduler"):
        fast("a cat", num_inference_steps=2)


def test_the_pipeline_is_left_unchanged(sd, fast_sd):
    before = _state(sd.unet)
    scheduler_config = dict(sd.scheduler.config)
    modules = {name: type(m) for name, m in sd.unet.named_modules()}
    forwards = {name: m.forward for name, m in sd.unet.named_modules()}
    fast_sd("a cat", num_inference_steps=3, generator=_gen(), output_type="np", eta=1.0)
    after = _state(sd.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(sd.scheduler.config) == scheduler_config
    assert {name: type(m) for name, m in sd.unet.named_modules()} == modules
    assert all(m.forward == forwards[name] for name, m in sd.unet.named_modules())
    assert fast_sd.unet is sd.unet and fast_sd.vae is sd.vae  # shared components


# --- weights changed after accelerate -----------------------------------------------------------


def _perturb_(module, scale, through_data: bool):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4:  # the convolutions: the prepared model holds channels_last copies of these
                delta = scale * torch.randn(p.shape, generator=_gen(9))
                if through_data:
                    p.data += delta  # as PEFT's fuse_lora merges: no version bump, same storage
                else:
                    p.add_(delta)  # as an optimizer step


@pytest.mark.parametrize(
    "through_data, check_weights",
    [(False, True), (True, True), (False, False)],
    ids=["in-place", "through-data", "in-place-versions-only"],  # .data changes only the norms show
)
def test_a_weight_change_after_accelerate_gives_fresh_images(through_data, check_weights):
    pipe = ddim_pipeline(seed=4)
    fast = ddim_fast.accelerate(pipe, check_weights=check_weights)
    kwargs = dict(batch_size=2, num_inference_steps=5, eta=0.0)
    first, out, _ = _both(pipe, fast, **kwargs)
    assert np.abs(first - out).max() < TOL
    _perturb_(pipe.unet, 0.05, through_data)
    ref, out, _ = _both(pipe, fast, **kwargs)
    assert np.abs(ref - first).max() > 1e-2  # the change shows in the images
    assert np.abs(out - ref).max() < TOL


def test_a_replaced_unet_and_a_changed_module_attribute_are_seen():
    pipe = ddim_pipeline(seed=4)
    fast = ddim_fast.accelerate(pipe)
    kwargs = dict(batch_size=1, num_inference_steps=4)
    _both(pipe, fast, **kwargs)
    other = copy.deepcopy(pipe.unet)
    _perturb_(other, 0.05, False)
    pipe.unet = other
    ref, out, _ = _both(pipe, fast, **kwargs)
    assert np.abs(out - ref).max() < TOL
    pipe.unet.mid_block.resnets[0].output_scale_factor = 2.0  # a plain attribute (as a LoRA scale is)
    ref, out, _ = _both(pipe, fast, **kwargs)
    assert np.abs(out - ref).max() < TOL


def test_the_watch_sees_a_small_change_of_low_precision_weights():
    from ddim_fast.apps.pipelines import WeightsWatch

    layer = torch.nn.Linear(1000, 1000).to(torch.bfloat16)
    watch = WeightsWatch(layer)
    with torch.no_grad():
        layer.weight.data[0, :10] += 0.5  # no version bump, same storage: only the norms show it
    assert watch.changed() and not watch.changed()


def test_samplers_are_cached_per_steps_and_eta_and_share_one_prepared_model():
    pipe = ddim_pipeline()
    fast = ddim_fast.accelerate(pipe)
    for steps, eta in ((4, 0.0), (5, 0.0), (4, 1.0), (4, 0.0)):
        fast(batch_size=1, generator=_gen(), num_inference_steps=steps, eta=eta, output_type="np")
    samplers = list(fast._samplers.values())
    assert len(samplers) == 3
    assert len({id(s._preparation) for s in samplers}) == 1 and samplers[0]._preparation.model is not None


# --- the samplers and the schedule refuse what they cannot honour ---------------------------------


def test_samplers_refuse_a_pipeline_as_the_model():
    pipe = ddim_pipeline()
    for cls in (FastSampler, ReferenceSampler):
        with pytest.raises(TypeError, match=r"pipe\.unet.*ddim_fast\.accelerate\(pipe\)"):
            cls(pipe, Schedule.linear(), steps=2)


def test_samplers_accept_return_dict_false_outputs():
    pipe = ddim_pipeline()
    schedule, options = Schedule.from_diffusers_config(pipe.scheduler)
    x = torch.randn((1, 3, 8, 8), generator=_gen())
    ref = ReferenceSampler(pipe.unet, schedule, steps=3, **options).sample(x)
    for cls in (FastSampler, ReferenceSampler):
        out = cls(pipe.unet, schedule, steps=3, **options).sample(x, model_kwargs={"return_dict": False})
        assert (out.float() - ref).abs().max() < TOL


def test_from_diffusers_config_refuses_other_schedulers_by_name():
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler

    # (DPM-Solver, Euler and LCM map to their solvers: tests/test_dpm_diffusers.py, test_schedulers_diffusers.py)
    for scheduler in (PNDMScheduler(), DDPMScheduler()):
        name = type(scheduler).__name__
        with pytest.raises(ValueError, match=name):
            Schedule.from_diffusers_config(scheduler)
        for config in (scheduler.config, dict(scheduler.config)):
            with pytest.raises(ValueError, match="not a DDIMScheduler config"):
                Schedule.from_diffusers_config(config)
        with pytest.raises(ValueError, match=name):
            Schedule.from_diffusers_config(dict(scheduler.config, _class_name=name))
    for config in (EulerAncestralDiscreteScheduler().config, dict(EulerAncestralDiscreteScheduler().config)):  # no key of its own
        with pytest.raises(ValueError, match="pass the scheduler object itself"):
            Schedule.from_diffusers_config(config)
    switched = DDIMScheduler.from_config(DPMSolverMultistepScheduler().config)  # carries DPM's keys: still DDIM's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning for reading a scheduler object
        schedule, options = Schedule.from_diffusers_config(switched)
    assert options["clip_x0"] == 1.0 and schedule.num_train_timesteps == 1000
    assert Schedule.from_diffusers_config({"beta_schedule": "linear"})[1]["skip"] == "leading"  # a hand-written dict


# --- generator lists and noise_dtype on the samplers ----------------------------------------------

SHAPE = (3, 5, 5)  # 75 elements: torch.randn in fp16 is not the fp32 draw rounded at this size
LOOPS = [False, pytest.param("emulate", marks=requires_triton_interpreter)]


def _smooth_model(x, t):
    """An analytic eps-model: any shape, no weights."""
    return 0.5 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1).to(x.dtype)


def _fast(cuda_graph, **kwargs):
    return FastSampler(_smooth_model, Schedule.linear(), cuda_graph=cuda_graph, backend="triton" if cuda_graph else None, **kwargs)


@pytest.mark.parametrize("cuda_graph", LOOPS)
def test_a_list_of_generators_draws_each_sample_from_its_own(cuda_graph):
    ref = ReferenceSampler(_smooth_model, Schedule.linear(), steps=4, eta=1.0)
    lone = [ref.sample(batch_size=1, shape=SHAPE, generator=_gen(seed)) for seed in (1, 2, 3)]
    together = ref.sample(batch_size=3, shape=SHAPE, generator=[_gen(1), _gen(2), _gen(3)])
    assert (together - torch.cat(lone)).abs().max() < 1e-6  # sample i depends on generator i only
    fast = _fast(cuda_graph, steps=4, eta=1.0)
    out = fast.sample(batch_size=3, shape=SHAPE, generator=[_gen(1), _gen(2), _gen(3)])
    assert (out - together).abs().max() < 1e-5
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        fast.sample(batch_size=3, shape=SHAPE, generator=[_gen(1), _gen(2)])
    with pytest.raises(ValueError, match="fast_rng"):
        FastSampler(_smooth_model, Schedule.linear(), steps=2, eta=1.0, fast_rng=True).sample(batch_size=2, shape=SHAPE, generator=[_gen(1), _gen(2)])


@pytest.mark.parametrize("cuda_graph", LOOPS)
def test_a_list_of_generators_in_fp16_fills_the_noise_table_as_the_reference_draws(cuda_graph):
    """A list of generators feeds the captured loop's per-run noise table (z_host), here with
    fp16 draws (z_host_draw): what a CUDA run of an fp16 diffusers pipeline takes."""
    x_T = torch.randn((2, *SHAPE), generator=_gen(7))
    gens = lambda: [_gen(1), _gen(2)]  # noqa: E731
    ref = ReferenceSampler(_smooth_model, Schedule.linear(), steps=4, eta=1.0).sample(x_T, generator=gens(), noise_dtype=torch.float16)
    fast = _fast(cuda_graph, steps=4, eta=1.0)
    out = fast.sample(x_T, generator=gens(), noise_dtype=torch.float16)
    assert (out - ref).abs().max() < 1e-5
    if cuda_graph:
        (loop,) = fast._graphs._entries.values()
        assert loop.z_table is not None and loop.z_host_draw is not None and loop.z_host_draw.dtype == torch.float16


@pytest.mark.parametrize("cuda_graph", LOOPS)
def test_noise_dtype_draws_as_torch_randn_draws_in_that_dtype(cuda_graph):
    x_T = torch.randn((2, *SHAPE), generator=_gen(7))
    ref_sampler = ReferenceSampler(_smooth_model, Schedule.linear(), steps=4, eta=1.0)
    ref_gen = _gen(1)
    ref = ref_sampler.sample(x_T, generator=ref_gen, noise_dtype=torch.float16)
    assert (ref - ref_sampler.sample(x_T, generator=_gen(1))).abs().max() > 1e-2  # another stream at this size
    by_hand = _gen(1)
    for _ in range(3):  # steps 1-3 draw (the last has σ = 0)
        torch.randn(x_T.shape, generator=by_hand, dtype=torch.float16)
    assert torch.equal(ref_gen.get_state(), by_hand.get_state())
    out = _fast(cuda_graph, steps=4, eta=1.0).sample(x_T, generator=_gen(1), noise_dtype=torch.float16)
    assert (out - ref).abs().max() < 1e-5


# --- the command line takes a diffusers folder ------------------------------------------------------


def _cli(capsys, *argv):
    from ddim_fast.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _expected_uint8(unet, scheduler, n, steps, seed=0):
    """What `sample --seed` draws from a diffusers UNet: the reference loop with its scheduler's
    options, from x_T = indexed_noise(seed, i)."""
    from ddim_fast.cli.common import to_uint8
    from ddim_fast.sampling.noise import indexed_noise

    schedule, options = Schedule.from_diffusers_config(scheduler)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = indexed_noise(seed, 0, n, shape)
    return to_uint8(ReferenceSampler(unet, schedule, steps=steps, **options).sample(x_T))


@pytest.mark.parametrize("which", ["pipeline", "unet-subfolder"])
def test_cli_samples_from_a_saved_ddim_pipeline(tmp_path, capsys, which):
    pipe = ddim_pipeline(seed=2)
    pipe.save_pretrained(tmp_path / "pipe")
    folder = tmp_path / "pipe" if which == "pipeline" else tmp_path / "pipe" / "unet"
    out_dir = tmp_path / "samples"
    code, out, _ = _cli(capsys, "sample", "--model", str(folder), "--steps", "5", "--num-samples", "3", "--batch-size", "2", "--out-dir", str(out_dir), "--quiet")
    assert code == 0
    assert "skip leading" in out and "clip 1" in out  # the folder's DDIMScheduler: leading spacing, clip_sample
    with np.load(out_dir / "samples.npz") as f:
        images = f["arr_0"]
    assert images.shape == (3, 8, 8, 3)
    expected = _expected_uint8(pipe.unet, pipe.scheduler, 3, 5)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # uint8 rounding of fp32 noise
    code, out, _ = _cli(capsys, "sample", "--model", str(folder), "--steps", "5", "--num-samples", "1", "--clip", "none", "--skip", "uniform", "--out", str(tmp_path / "g.png"))
    assert code == 0 and "clip" not in out.split("FastSampler")[1].split("batch")[0] and "skip" not in out  # the command line over the folder


def test_cli_reads_an_official_structure_unet2d_folder_as_our_unet(tmp_path, capsys):
    from ddim_fast.models.diffusers_compat import to_diffusers
    from ddim_fast.models.unet import UNet

    torch.manual_seed(0)
    ours = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), in_channels=3, out_ch=3, resolution=8).eval()
    to_diffusers(ours).save_pretrained(tmp_path / "unet")
    code, out, err = _cli(capsys, "sample", "--model", str(tmp_path / "unet"), "--steps", "3", "--num-samples", "2", "--out", str(tmp_path / "g.png"))
    assert code == 0 and "as ddim-fast's UNet" in out
    assert "no scheduler config beside the UNet" in err


def test_cli_explains_a_diffusers_state_dict_and_other_folders(tmp_path, capsys):
    from safetensors.torch import save_file

    pipe = ddim_pipeline()
    torch.save(pipe.unet.state_dict(), tmp_path / "unet.pt")
    save_file(pipe.unet.state_dict(), str(tmp_path / "unet.safetensors"))
    for path in (tmp_path / "unet.pt", tmp_path / "unet.safetensors"):
        code, _, err = _cli(capsys, "sample", "--model", str(path), "--steps", "2", "--num-samples", "1")
        assert code == 2 and "holds a diffusers UNet state dict" in err and "save_pretrained" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "sample", "--model", str(tmp_path / "empty"), "--steps", "2", "--num-samples", "1")
    assert code == 2 and "not one diffusers' save_pretrained wrote" in err


@requires_triton_interpreter
@pytest.mark.parametrize("generator", ["one", "list"])
def test_accelerate_through_the_emulated_captured_loop(generator):
    """The captured loop's code, uncaptured (cuda_graph="emulate"): what a GPU runs, the noise
    drawn inside the loop from one generator or into the per-run table from a list."""
    pipe = ddim_pipeline(seed=1)
    fast = ddim_fast.accelerate(pipe, cuda_graph="emulate")
    gens = (lambda: _gen(3)) if generator == "one" else (lambda: [_gen(3), _gen(4)])
    ref_gen, fast_gen = gens(), gens()
    ref = pipe(batch_size=2, generator=ref_gen, eta=1.0, num_inference_steps=6, output_type="np").images
    out = fast(batch_size=2, generator=fast_gen, eta=1.0, num_inference_steps=6, output_type="np").images
    assert np.abs(out - ref).max() < TOL
    (loop,) = next(iter(fast._samplers.values()))._graphs._entries.values()
    assert (loop.z_table is not None) == (generator == "list")
    first = lambda g: g if isinstance(g, torch.Generator) else g[0]  # noqa: E731
    assert torch.equal(first(ref_gen).get_state(), first(fast_gen).get_state())


# --- on a GPU -------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("generator", ["cpu", "cuda", "cuda-list"])
def test_accelerate_on_cuda_gives_the_pipelines_images(generator):
    """The captured loop: a CPU generator (the host noise table), a CUDA one (drawn inside the
    graph from the caller's state) and a list (the table, one draw per sample)."""
    pipe = ddim_pipeline(seed=1).to("cuda")
    fast = ddim_fast.accelerate(pipe)

    def gens():
        if generator == "cpu":
            return _gen(3)
        if generator == "cuda":
            return torch.Generator(device="cuda").manual_seed(3)
        return [torch.Generator(device="cuda").manual_seed(3 + i) for i in range(2)]

    ref = pipe(batch_size=2, generator=gens(), eta=1.0, num_inference_steps=10, output_type="np").images
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # captured: no fallback warning
        out = fast(batch_size=2, generator=gens(), eta=1.0, num_inference_steps=10, output_type="np").images
    sampler = next(iter(fast._samplers.values()))
    assert sampler._graphs is not None and sampler._graphs.disabled_reason is None
    assert np.abs(out - ref).max() < 5e-4  # fp32 on the GPU, TF32 off (tests/conftest.py)


@requires_cuda
def test_accelerate_fp16_stable_diffusion_on_cuda(sd):
    pipe = copy.deepcopy(sd).to(device="cuda", dtype=torch.float16)
    fast = ddim_fast.accelerate(pipe)
    kwargs = dict(prompt=["a cat", "a dog"], negative_prompt=["", "blurry"], num_inference_steps=8, eta=1.0, output_type="np")
    ref = pipe(**kwargs, generator=torch.Generator(device="cuda").manual_seed(0)).images
    out = fast(**kwargs, generator=torch.Generator(device="cuda").manual_seed(0)).images
    assert np.abs(out.astype(np.float32) - ref.astype(np.float32)).max() < 2e-2  # fp16 rounding, differently ordered


@requires_cuda
def test_accelerate_with_fast_rng_on_cuda():
    """fast_rng: the kernel's own step noise; the same images at η = 0, other (finite) ones for η > 0."""
    pipe = ddim_pipeline(seed=1).to(device="cuda", dtype=torch.float16)
    fast = ddim_fast.accelerate(pipe, fast_rng=True)
    ref = pipe(batch_size=2, generator=_gen(3), num_inference_steps=6, output_type="np").images
    out = fast(batch_size=2, generator=_gen(3), num_inference_steps=6, output_type="np").images
    assert np.abs(out.astype(np.float32) - ref.astype(np.float32)).max() < 2e-2
    noisy = fast(batch_size=2, generator=_gen(3), num_inference_steps=6, eta=1.0, output_type="np").images
    assert noisy.shape == ref.shape and np.isfinite(noisy.astype(np.float32)).all()
