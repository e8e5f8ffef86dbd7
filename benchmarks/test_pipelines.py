"""Wall-clock time of a whole diffusers pipeline call (text encoding, the guided loop at
w = 7.5, the VAE decode, post-processing): `pipe(...)` against `ddim_fast.accelerate(pipe)(...)`.

    pytest benchmarks/test_pipelines.py --benchmark-only
    pytest benchmarks/test_pipelines.py --benchmark-only --ddim-scheduler dpmpp_2m_karras --ddim-steps 20

The scheduler is the pipeline's DDIMScheduler, or with --ddim-scheduler another made from its
config as users make one (Scheduler.from_config(pipe.scheduler.config)): dpmpp_2m,
dpmpp_2m_karras (DPM++ 2M Karras), euler, euler_a, lcm.

(With --benchmark-disable, as the test suite runs it, only the first S runs, once.)

Pipelines (random weights, built from configs: tests/tiny_pipelines.py): "tiny", a
StableDiffusionPipeline of 16x16 images (8x8 latents, a 2-level UNet of width 32, a 2-layer
text encoder), on every machine; on a GPU also "sd15", SD-1.5's UNet, VAE and text encoder
(512x512 images, fp16, as users load it). Both need diffusers and transformers (skipped
without them). Implementations: "pipe" (the pipeline's own call), "accelerate"
(ddim_fast.accelerate(pipe)) and, with --benchmark-only --ddim-full, "pipe-compile" (the pipeline with
`pipe.unet = torch.compile(pipe.unet)`, the peer users reach for: Inductor's default mode
on a CPU, "reduce-overhead" on a GPU), "accelerate-compile" (accelerate(pipe,
compile=True): Inductor for the UNet inside our loop) and, on a GPU, "pipe-compile-max-autotune"
(the same with mode="max-autotune", the peer stable-fast's published table compares with).
The `sd15` stages of benchmarks/gpu_run.sh time the SD-1.5-sized pipeline at S = 50 this
way: pipe(...), ours and the reduce-overhead peer, then the max-autotune peer in a pytest of
its own (its compile may outlast the device call).
"""

import functools
import tempfile

import pytest
import torch

GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"


# --ddim-scheduler: (the diffusers class, the options from_config adds to the pipeline's config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


@functools.lru_cache(maxsize=None)
def _pipeline(name: str, device: str, scheduler: str = "ddim"):
    pytest.importorskip("diffusers", reason="the pipeline rows need diffusers (pip install ddim-fast[diffusers])")
    pytest.importorskip("transformers", reason="the pipeline rows need transformers (a CLIP text encoder)")
    import diffusers

    from tests.tiny_pipelines import sd_pipeline

    pipe = sd_pipeline(tempfile.mkdtemp(prefix="ddim-fast-tokenizer-"), size=name)
    cls, extra = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return pipe.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _implementation(impl: str, name: str, device: str, scheduler: str = "ddim"):
    import ddim_fast

    pipe = _pipeline(name, device, scheduler)
    if impl == "pipe":
        return pipe
    if impl == "accelerate":
        return ddim_fast.accelerate(pipe)
    if impl == "accelerate-compile":
        return ddim_fast.accelerate(pipe, compile=True)
    from diffusers import StableDiffusionPipeline

    if impl == "pipe-compile-max-autotune":
        mode = "max-autotune"
    else:
        mode = "reduce-overhead" if device == "cuda" else "default"
    components = dict(pipe.components, unet=torch.compile(pipe.unet, mode=mode))
    peer = StableDiffusionPipeline(**components, requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    return peer


def _grid_error(pipe, steps: int):
    """Why the pipeline's scheduler has no S-step grid (SD's leading spacing with steps_offset=1
    reaches t = T at S = T), or None."""
    from ddim_fast import Schedule

    schedule, options = Schedule.from_diffusers_config(pipe.scheduler)
    try:
        schedule.timesteps(steps, options.get("skip", "uniform"), steps_offset=options.get("steps_offset", 0))
    except ValueError as e:
        return str(e)
    return None


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    steps = [int(v) for v in opt("--ddim-steps").split(",")]
    if opt("benchmark_disable"):  # the test suite's pass: each implementation once, at the smallest S
        steps = steps[:1]
    pipelines = ["tiny", "sd15"] if torch.cuda.is_available() else ["tiny"]
    metafunc.parametrize("pipeline", pipelines)
    metafunc.parametrize("steps", steps, ids=lambda s: f"S{s}")
    max_autotune = ["pipe-compile-max-autotune"] if torch.cuda.is_available() else []
    metafunc.parametrize("impl", ["pipe", "accelerate", "pipe-compile", "accelerate-compile"] + max_autotune)
    scheduler = opt("--ddim-scheduler")
    if scheduler not in SCHEDULERS:
        raise pytest.UsageError(f"--ddim-scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    metafunc.parametrize("scheduler", [scheduler])


def test_pipeline_call(benchmark, bench_config, compile_budget, impl, pipeline, steps, scheduler):
    if steps >= 1000 and pipeline == "sd15":
        pytest.skip("S = 1000 of the SD-1.5-sized pipeline takes minutes a call; its per-step time is the S = 100 row's")
    compiled = impl.endswith("-compile")
    if compiled:
        compile_budget.admit_compiled(benchmark, f"pipeline-{pipeline}-S{steps}: {impl}")
    device = bench_config["device"]
    off_the_schedule = _grid_error(_pipeline(pipeline, device, scheduler), steps)
    if off_the_schedule:
        pytest.skip(f"S = {steps} is not a grid of this scheduler ({off_the_schedule}); diffusers' own call fails there too")
    call = _implementation(impl, pipeline, device, scheduler)

    def run():
        out = call(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="np")
        if device == "cuda":
            torch.cuda.synchronize()
        return out.images

    benchmark.group = f"pipeline-{pipeline}-S{steps}" + ("" if scheduler == "ddim" else f"-{scheduler}")
    benchmark.extra_info.update(
        impl=impl,
        steps=steps,
        model=f"{pipeline} StableDiffusionPipeline",
        pipeline=pipeline,
        scheduler=SCHEDULERS[scheduler][0] + (" (Karras sigmas)" if scheduler.endswith("karras") else ""),
        device=device,
        guidance=GUIDANCE,
        dtype="fp16" if device == "cuda" else "fp32",
        batch=1,
    )
    if not benchmark.disabled:
        compile_budget.first_call(benchmark, run, compiled)
    if steps >= 100 or pipeline == "sd15":
        images = benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        images = benchmark(run)
    assert images.shape[0] == 1 and images.shape[-1] == 3
