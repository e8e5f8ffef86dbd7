"""FastSampler(compile=...): the prepared model through torch.compile (Inductor's C++
backend here), the same samples as the eager fused path, one compile per shape."""

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet, ops

SCHEDULE = Schedule.linear()

pytestmark = pytest.mark.slow  # each compile takes 10-20 s on 2 cores


def _small_unet(**kw):
    torch.manual_seed(0)
    return UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=3, out_ch=3, resolution=8, **kw).eval()


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "fused-copy"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_compiled_matches_the_eager_fused_path(lean, eta):
    model = _small_unet()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eager = FastSampler(model, SCHEDULE, steps=4, eta=eta, lean=lean).sample(x, generator=torch.Generator().manual_seed(2))
    compiled = FastSampler(model, SCHEDULE, steps=4, eta=eta, lean=lean, compile=True).sample(x, generator=torch.Generator().manual_seed(2))
    scale = eager.abs().max().item()
    assert (compiled - eager).abs().max().item() <= 1e-4 * (1 + scale)


@pytest.mark.parametrize("lean", [True, False])
def test_compiled_guided_sampling_matches_the_reference(lean):
    """compile=True with class labels and guidance: the labels reach the compiled model as a
    keyword argument, the guided step stays ours."""
    model = _small_unet(num_classes=4)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(model_kwargs={"class_labels": torch.tensor([0, 3])}, guidance_scale=2.0, uncond_kwargs={"class_labels": torch.tensor([4, 4])})
    ref = ReferenceSampler(model, SCHEDULE, steps=3).sample(x, **kw)
    compiled = FastSampler(model, SCHEDULE, steps=3, lean=lean, compile=True).sample(x, **kw)
    assert (compiled - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item())


def test_the_embedded_model_compiles_and_a_second_sample_does_not_recompile():
    from torch._dynamo.utils import counters

    model = UNet.from_pretrained("digits").eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = FastSampler(model, SCHEDULE, steps=5, compile=True)
    before = counters["stats"]["unique_graphs"]
    first = sampler.sample(x)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before, "compile=True compiled nothing"
    second = sampler.sample(x)
    assert counters["stats"]["unique_graphs"] == graphs, "a second sample() of the same shape compiled again"
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    eager = FastSampler(model, SCHEDULE, steps=5).sample(x)
    assert (first - eager).abs().max().item() <= 1e-4 * (1 + eager.abs().max().item())


def test_every_ops_entry_point_compiles_without_a_graph_break():
    def every_op(x, eps, w, b, r):
        h = ops.group_norm_silu(x, 4, w, b, 1e-6)
        g = ops.group_norm_act(h, 4, w, b, 1e-6, silu=False)
        s, y = ops.group_norm_act(g, 4, w, b, 1e-6, silu=True, residual=r)
        t, n = ops.add_layer_norm(s, y, eps=1e-5)  # over the last dimension
        gated = ops.geglu(torch.cat([t, n], dim=-1))
        x0 = ops.predict_x0(gated, eps, 0.6, clip=(-1.0, 1.0))
        return ops.ddim_step(s, eps, 0.6, 0.8, 0.1, noise=x0) + x0

    args = [torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)] + [torch.randn(8), torch.randn(8), torch.randn(2, 8, 5, 5)]
    compiled = torch.compile(every_op, fullgraph=True)
    torch.testing.assert_close(compiled(*args), every_op(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", None], ids=["triton", "default"])
def test_every_ops_entry_point_compiles_on_cuda_and_inductor_sees_the_triton_kernels(backend):
    """On CUDA the Triton backend's ops are torch.library triton_ops: Inductor lowers them to
    calls of our kernels inside its own generated code (the native ops stay extern calls)."""
    from torch._inductor.utils import run_and_get_code

    def every_op(x, eps, w, b, r):
        h = ops.group_norm_silu(x, 4, w, b, 1e-6, add_bias=w, backend=backend)
        g = ops.group_norm_act(h, 4, w, b, 1e-6, silu=False, backend=backend)
        s, y = ops.group_norm_act(g, 4, w, b, 1e-6, silu=True, residual=r, backend=backend)
        t, n = ops.add_layer_norm(s, y, eps=1e-5, backend=backend)
        gated = ops.geglu(torch.cat([t, n], dim=-1), backend=backend)
        x0 = ops.predict_x0(gated, eps, 0.6, clip=(-1.0, 1.0), backend=backend)
        return ops.ddim_step(s, eps, 0.6, 0.8, 0.1, noise=x0, backend=backend) + x0

    gen = torch.Generator().manual_seed(3)
    args = [torch.randn(s, generator=gen).cuda() for s in ((2, 8, 5, 5), (2, 8, 5, 5), (8,), (8,), (2, 8, 5, 5))]
    compiled = torch.compile(every_op, fullgraph=True)
    out, code = run_and_get_code(compiled, *args)
    torch.testing.assert_close(out, every_op(*args), rtol=1e-5, atol=1e-5)
    if backend == "triton":
        for kernel in ("_gn_one_pass_kernel", "_add_layer_norm_rows_kernel", "_geglu_kernel", "_predict_x0_kernel", "_ddim_step_kernel"):
            assert kernel in "\n".join(code), f"{kernel} is not in Inductor's generated code"


@pytest.mark.parametrize("bad", ["fast", "reduce-overhead", 1, 0, None, "max_autotune"])
def test_a_bad_compile_value_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"compile must be False, True or 'max-autotune', got"):
        FastSampler(_small_unet(), SCHEDULE, steps=3, compile=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# max-autotune compiled for over 200 s on the H100: not in the GPU tier (-m "gpu and not
# autotune"), but in gpu_run.sh's compile stage, which budgets for it (-m autotune)
@pytest.mark.parametrize("compile_mode", [True, pytest.param("max-autotune", marks=pytest.mark.autotune)])
def test_compiled_model_inside_our_cuda_graph_matches_eager(compile_mode):
    """Inductor's kernels captured with our fused step in one graph: the same samples as the
    eager loop without compile (TF32 off for both, so the comparison is of fp32 arithmetic)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = _small_unet().cuda()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).cuda()
    eager = FastSampler(model, SCHEDULE, steps=6, cuda_graph=False).sample(x)
    sampler = FastSampler(model, SCHEDULE, steps=6, compile=compile_mode)
    graphed = sampler.sample(x)
    assert sampler._graphs is not None and len(sampler._graphs) == 1, f"not captured: {sampler._graphs and sampler._graphs.disabled_reason}"
    assert (graphed - eager).abs().max().item() <= 1e-3 * (1 + eager.abs().max().item())
