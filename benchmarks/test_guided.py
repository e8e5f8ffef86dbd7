"""Wall-clock time of guided sampling (classifier-free guidance, w = 7.5): the reference loop
against FastSampler, for each S, on conditional models.

    pytest benchmarks/test_guided.py --benchmark-only

(With --benchmark-disable, as the test suite runs it, only the first S and batch run, once.)

Models: "cond-digits" (the embedded digits model's class-conditional twin's architecture,
random weights: 1x16x16, class labels; what keeps the CPU suite short); on a GPU also "sd15", a Stable-Diffusion-1.5-sized
UNet2DConditionModel (random weights, 4x64x64 latents, a 77x768 context), which needs
diffusers (skipped without it). Implementations as test_sampling's: reference, fast (fp32;
bf16 on a GPU) and, with --benchmark-only --ddim-full, the compile peers: ReferenceSampler over
torch.compile(model) (each guided step is then one compiled call on the doubled batch and
the combine in eager PyTorch, as a user's pipeline does it).
"""

import functools

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet

from ddim_fast.apps.quality.train import DIGITS_COND_MODEL_CONFIG

from ._models import in_dtype, record_flops_per_step, sampling_call, timed, warm_up_estimate

SCHEDULE = Schedule.linear()
GUIDANCE = 7.5


@functools.lru_cache(maxsize=None)
def _model(name: str, device: str):
    torch.manual_seed(0)
    if name == "cond-digits":
        return UNet(**DIGITS_COND_MODEL_CONFIG).eval().to(device)
    from diffusers import UNet2DConditionModel

    sd15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
    return UNet2DConditionModel(**sd15).eval().to(device)


def _conditioning(name: str, batch: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    if name == "cond-digits":
        labels = torch.randint(0, 10, (batch,), generator=g).to(device)
        return dict(model_kwargs={"class_labels": labels}, guidance_scale=GUIDANCE, uncond_kwargs={"class_labels": torch.full_like(labels, 10)}), (1, 16, 16)
    cond = torch.randn(batch, 77, 768, generator=g).to(device=device, dtype=dtype)
    uncond = torch.randn(batch, 77, 768, generator=g).to(device=device, dtype=dtype)
    return dict(model_kwargs={"encoder_hidden_states": cond}, guidance_scale=GUIDANCE, uncond_kwargs={"encoder_hidden_states": uncond}), (4, 64, 64)


def _impls(device):
    dtypes = ("fp32", "bf16") if device == "cuda" else ("fp32",)
    modes = ("reduce-overhead", "default") if device == "cuda" else ("default",)
    return [("reference", "fp32")] + [("fast", d) for d in dtypes] + [(f"peer-{m}", d) for m in modes for d in dtypes]


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    cuda = torch.cuda.is_available()
    steps = [int(v) for v in opt("--ddim-steps").split(",")]
    batches = [int(v) for v in (opt("--ddim-batch") or ("1,16" if cuda else "1,8")).split(",")]
    models = ["cond-digits", "sd15"] if cuda else ["cond-digits"]
    if opt("benchmark_disable"):  # the test suite's pass: each implementation once, at the smallest S and batch
        steps, batches = steps[:1], batches[:1]
    impls = _impls("cuda" if cuda else "cpu")
    metafunc.parametrize("model", models)
    metafunc.parametrize("batch", batches, ids=lambda b: f"b{b}")
    metafunc.parametrize("steps", steps, ids=lambda s: f"S{s}")
    metafunc.parametrize("impl, dtype", impls, ids=[f"{i}-{d}" if i != "reference" else i for i, d in impls])


@functools.lru_cache(maxsize=None)
def _compiled(name, device, mode, dtype):
    return torch.compile(in_dtype(_model(name, device), dtype), mode=mode)


def test_guided_sample(benchmark, bench_config, compile_budget, impl, dtype, model, batch, steps):
    if model == "sd15":
        pytest.importorskip("diffusers", reason="the SD-1.5-sized row needs diffusers (pip install ddim-fast[diffusers])")
    compiled = impl.startswith("peer-")
    if compiled:
        compile_budget.admit_compiled(benchmark, f"guided-{model}-S{steps}-b{batch}: {impl}-{dtype}")
    device = bench_config["device"]
    net = _model(model, device)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    kw, shape = _conditioning(model, batch, device, torch_dtype if compiled else torch.float32)

    def make(s):
        if impl == "reference":
            return ReferenceSampler(net, SCHEDULE, steps=s)
        if compiled:
            return ReferenceSampler(_compiled(model, device, impl[len("peer-"):], dtype), SCHEDULE, steps=s)
        return FastSampler(net, SCHEDULE, steps=s, dtype=dtype)

    sampler = make(steps)
    x_T = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    if compiled:
        x_T = x_T.to(torch_dtype)
    benchmark.group = f"guided-{model}-S{steps}-b{batch}"
    benchmark.extra_info.update(impl=impl, dtype=dtype, steps=steps, batch=batch, model=model, device=device, guidance=GUIDANCE)

    run = sampling_call(sampler, x_T, **kw)
    call_s = None
    if not benchmark.disabled:
        # warm-up outside the clock: the graph capture (fast on a GPU) or a short run (oneDNN's
        # set-up, the compile) of the same model
        warm_up = run if (impl == "fast" and device == "cuda") else (lambda: make(2).sample(x_T, **kw))
        compile_budget.first_call(benchmark, warm_up, compiled)
        if warm_up is not run and not compiled:  # a 2-step warm-up without a compile: the model's steps
            call_s = warm_up_estimate(benchmark, 2, steps)
    record_flops_per_step(benchmark, (model, batch, "guided"), net, x_T, **_conditioning(model, batch, device, torch.float32)[0])
    out = timed(benchmark, run, steps, full_matrix=bench_config["full_matrix"], long=model == "sd15", call_s=call_s)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
