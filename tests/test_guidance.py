"""Conditional models and classifier-free guidance: the fused guided step on every backend
(against float64, outputs poisoned), both samplers with model_kwargs and guidance, the
captured loop's buffers (without a graph, Triton under its interpreter), the class-conditional
UNet, and the errors for bad conditioning."""

import math

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet, ops
from ddim_fast.models.lean import LeanUNet
from ddim_fast.sampling import graph as G

from .conftest import max_err, tiny_unet
from .test_ops import BACKENDS, DTYPES, _close, _inputs, _poison, ref_ddim_step

SCHEDULE = Schedule.linear()


def cond_unet(seed=0, **kw):
    return tiny_unet(seed, num_classes=10, **kw)


# --- the fused guided step ----------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 1, 1, 1), (1037,)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("w, sigma_frac, clip, clipped_eps", [(7.5, 0.0, None, False), (1.0, 0.6, None, False), (-0.5, 0.0, 1.0, False), (3.0, 0.6, (-0.5, 2.0), True)])
def test_guided_step(backend, device, dtype, atol, rtol, shape, prediction, w, sigma_frac, clip, clipped_eps):
    a_t, a_s = 0.37, 0.81
    sigma = sigma_frac * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    x, u, z = _inputs(shape, dtype, device)
    _, c, _ = _inputs(shape, dtype, device, seed=1)
    out, x0_out = _poison(torch.empty_like(x)), _poison(torch.empty_like(x))
    ret = ops.guided_step(x, u, c, w, a_t, a_s, sigma, noise=z if sigma else None, clip=clip, out=out, prediction=prediction, use_clipped_model_output=clipped_eps, x0_out=x0_out, backend=backend)
    assert ret is out
    guided = u.double() + w * (c.double() - u.double())
    ref, ref_x0 = ref_ddim_step(x, guided, a_t, a_s, sigma, z, (-clip, clip) if isinstance(clip, float) else clip, prediction, clipped_eps, False)
    # the combination is rounded once more in low precision storage than ddim_step's input
    scale = max(1.0, ref.abs().max().item(), ref_x0.abs().max().item())
    _close(out, ref, dtype, atol * scale, rtol)
    _close(x0_out, ref_x0, dtype, atol * scale, rtol)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_guided_step_on_the_halves_of_a_doubled_batch_in_place(backend, device):
    """The samplers' call: uncond and cond are the two halves of one channels_last output, out is x."""
    a_t, a_s, sigma, w = 0.5, 0.9, 0.2, 4.0
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    x, _, z = _inputs((3, 4, 5, 6), torch.float32, device, seed=5)
    out2 = cl(torch.randn(6, 4, 5, 6, generator=torch.Generator().manual_seed(6)).to(device))
    ref, _ = ref_ddim_step(x, out2[:3].double() + w * (out2[3:].double() - out2[:3].double()), a_t, a_s, sigma, z, None, "eps", False, False)
    xx = cl(torch.empty(6, 4, 5, 6, device=device))
    xx[:3].copy_(x)
    xx[3:].fill_(float("nan"))
    ops.guided_step(xx[:3], out2[:3], out2[3:], w, a_t, a_s, sigma, noise=cl(z), out=xx[:3], backend=backend)
    _close(xx[:3], ref, torch.float32, 1e-5, 1e-5)
    assert torch.isnan(xx[3:]).all()  # the second half is not the kernel's to write


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_guided_step_with_scale_1_is_ddim_step_on_cond(backend, device):
    x, u, z = _inputs((2, 3, 4, 5), torch.float32, device, seed=7)
    _, c, _ = _inputs((2, 3, 4, 5), torch.float32, device, seed=8)
    a = ops.guided_step(x, u, c, 1.0, 0.4, 0.7, 0.1, noise=z, backend=backend)
    b = ops.ddim_step(x, c, 0.4, 0.7, 0.1, noise=z, backend=backend)
    assert max_err(a, b) <= 1e-5 * (1 + b.abs().max().item())


def test_guided_step_bad_input():
    x = torch.randn(2, 3, 4, 4)
    for w in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            ops.guided_step(x, x, x, w, 0.5, 0.9, 0.0)
    with pytest.raises(ValueError, match="cond"):
        ops.guided_step(x, x, torch.randn(2, 3, 4, 5), 2.0, 0.5, 0.9, 0.0)
    with pytest.raises(TypeError, match="uncond must have x's dtype"):
        ops.guided_step(x, x.half(), x, 2.0, 0.5, 0.9, 0.0)


# --- the samplers ---------------------------------------------------------------------------

ETAS = [0.0, 0.5, 1.0, "ddpm_noisy"]


def _labels(n, seed=0):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def _guided_kwargs(n, w=3.0, rescale=None):
    kw = dict(model_kwargs={"class_labels": _labels(n)}, guidance_scale=w, uncond_kwargs={"class_labels": torch.full((n,), 10)})
    if rescale is not None:
        kw["guidance_rescale"] = rescale
    return kw


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("guided", ["none", "labels", "guided", "rescaled"])
def test_fast_sampler_matches_the_reference_with_conditioning(eta, lean, guided):
    model = cond_unet()
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"none": {}, "labels": dict(model_kwargs={"class_labels": _labels(3)}), "guided": _guided_kwargs(3), "rescaled": _guided_kwargs(3, rescale=0.7)}[guided]
    g_ref, g_fast = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = ReferenceSampler(model, SCHEDULE, steps=6, eta=eta).sample(x_T, generator=g_ref, **kw)
    got = FastSampler(model, SCHEDULE, steps=6, eta=eta, lean=lean).sample(x_T, generator=g_fast, **kw)
    assert max_err(got, ref) <= 2e-5 * (1 + ref.abs().max().item())
    assert torch.equal(torch.randn(4, generator=g_ref), torch.randn(4, generator=g_fast))  # the same draws
    assert got.shape == x_T.shape and got.untyped_storage().nbytes() == got.numel() * got.element_size()  # not a view of the doubled batch


def test_guidance_is_the_combination_of_the_two_model_outputs():
    """One step with σ = 0 in float64, by hand: ε = ε_u + w (ε_c − ε_u) through the update."""
    model = cond_unet().double()
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, null = _labels(2), torch.full((2,), 10)
    sampler = ReferenceSampler(model, SCHEDULE, steps=1)
    got = sampler.sample(x_T, model_kwargs={"class_labels": y}, guidance_scale=2.5, uncond_kwargs={"class_labels": null})
    t = torch.full((2,), sampler.timesteps[0])
    with torch.no_grad():
        eps = model(x_T, t, null) + 2.5 * (model(x_T, t, y) - model(x_T, t, null))
    a = float(SCHEDULE.alphas_cumprod64[sampler.timesteps[0]])
    expected = (x_T - math.sqrt(1 - a) * eps) / math.sqrt(a)  # the last step lands on x̂₀ (α_prev = 1)
    assert max_err(got, expected) <= 1e-10 * (1 + expected.abs().max().item())
    fast = FastSampler(model, SCHEDULE, steps=1).sample(x_T, model_kwargs={"class_labels": y}, guidance_scale=2.5, uncond_kwargs={"class_labels": null})
    assert max_err(fast, expected) <= 1e-10 * (1 + expected.abs().max().item())


def test_conditioning_changes_the_samples_and_null_label_is_the_default():
    model = cond_unet()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = FastSampler(model, SCHEDULE, steps=5)
    plain = fast.sample(x_T)
    null = fast.sample(x_T, model_kwargs={"class_labels": torch.full((4,), 10)})
    labelled = fast.sample(x_T, model_kwargs={"class_labels": _labels(4)})
    scale = 1 + null.abs().max().item()
    assert max_err(plain, null) <= 1e-5 * scale  # one shared row or a row per sample: rounding apart
    assert max_err(labelled, null) > 1e-2 * scale


@pytest.mark.parametrize("cls", [ReferenceSampler, FastSampler])
def test_encode_takes_model_kwargs(cls):
    model = cond_unet()
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = _labels(2)
    ref = ReferenceSampler(model, SCHEDULE, steps=5).encode(x0, model_kwargs={"class_labels": y})
    got = cls(model, SCHEDULE, steps=5).encode(x0, model_kwargs={"class_labels": y})
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())
    plain = cls(model, SCHEDULE, steps=5).encode(x0)
    assert max_err(plain, ref) > 1e-4  # the labels reached the model
    guided = cls(model, SCHEDULE, steps=5).encode(x0, **_guided_kwargs(2))
    ref_guided = ReferenceSampler(model, SCHEDULE, steps=5).encode(x0, **_guided_kwargs(2))
    assert max_err(guided, ref_guided) <= 1e-4 * (1 + ref_guided.abs().max().item())


def test_samplers_cast_float_kwargs_to_the_model_dtype():
    """A model dtype other than the caller's: float conditioning tensors reach the model in it."""
    seen = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x, t, emb=None, labels=None):
            seen.append((emb.dtype, labels.dtype))
            return self.conv(x) + emb.view(-1, 1, 1, 1).to(x.dtype)

    kw = dict(model_kwargs={"emb": torch.randn(2), "labels": torch.tensor([1, 2])})
    FastSampler(Model().eval(), SCHEDULE, steps=2, dtype="bf16").sample(torch.randn(2, 1, 4, 4), **kw)
    assert seen == [(torch.bfloat16, torch.int64)] * 2
    seen.clear()  # the reference gives a bf16 model its conditioning in bf16, as it gives x
    ReferenceSampler(Model().eval().to(torch.bfloat16), SCHEDULE, steps=2).sample(torch.randn(2, 1, 4, 4), **kw)
    assert seen == [(torch.bfloat16, torch.int64)] * 2


def test_nested_kwargs_and_other_values_pass_through():
    got = []

    def model(x, t, added_cond_kwargs=None, scale=None):
        got.append((added_cond_kwargs["text_embeds"].shape, added_cond_kwargs["time_ids"].shape, scale))
        return x * 0.1

    x_T = torch.randn(3, 2, 4, 4)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(3, 7), "time_ids": torch.randn(3, 6)}, "scale": 0.5}
    un = {"added_cond_kwargs": {"text_embeds": torch.zeros(3, 7), "time_ids": torch.randn(3, 6)}, "scale": 0.5}
    for cls in (ReferenceSampler, FastSampler):
        got.clear()
        cls(model, SCHEDULE, steps=2).sample(x_T, model_kwargs=kw, guidance_scale=2.0, uncond_kwargs=un)
        assert got == [(torch.Size([6, 7]), torch.Size([6, 6]), 0.5)] * 2


def test_graph_key_follows_the_conditioning_signature_not_its_values():
    from ddim_fast.sampling.conditioning import make_conditioning

    x = torch.zeros(2, 1, 8, 8)
    cache = G.GraphCache(4)
    spec = FastSampler(lambda x, t: x, Schedule.linear(100), steps=4).spec("sampling")
    key = lambda **kw: cache.key(spec, x, make_conditioning(x, kw.get("model_kwargs"), kw.get("guidance_scale"), kw.get("uncond_kwargs"), kw.get("guidance_rescale")))  # noqa: E731
    lab = lambda *v: {"class_labels": torch.tensor(v)}  # noqa: E731
    base = key(model_kwargs=lab(1, 2), guidance_scale=2.0, uncond_kwargs=lab(10, 10))
    assert base == key(model_kwargs=lab(5, 6), guidance_scale=7.5, uncond_kwargs=lab(10, 10))  # new values: replay
    assert base != key(model_kwargs=lab(1, 2))  # unguided
    assert base != key(model_kwargs=lab(1, 2), guidance_scale=2.0, uncond_kwargs=lab(10, 10), guidance_rescale=0.5)
    assert base != key(model_kwargs={"class_labels": torch.tensor([1, 2], dtype=torch.int32)}, guidance_scale=2.0, uncond_kwargs={"class_labels": torch.tensor([1, 2], dtype=torch.int32)})
    assert key() != base


# --- the class-conditional UNet -------------------------------------------------------------


def test_class_conditional_unet_and_its_lean_form():
    model = cond_unet()
    assert model.null_label == 10 and model.config["num_classes"] == 10
    assert "num_classes" not in tiny_unet().config  # an official config round-trips unchanged
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999])
    y = _labels(3)
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, torch.full((3,), 10)))
        lean = LeanUNet.from_unet(model, channels_last=False)
        for labels in (None, y):
            assert max_err(lean(x, t, labels), model(x, t, labels)) <= 1e-5 * (1 + model(x, t, labels).abs().max().item())
    restored = UNet(**model.config)
    restored.load_state_dict(model.state_dict(), strict=True)


def test_class_conditional_unet_bad_labels():
    model, plain = cond_unet(), tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 6])
    with pytest.raises(ValueError, match="not class-conditional"):
        plain(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\)"):
        model(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(x, t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="num_classes must be None or a positive int"):
        UNet(ch=32, num_classes=0)


# --- bad conditioning ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ReferenceSampler, FastSampler])
def test_bad_conditioning_gets_a_clear_error(cls):
    sampler = cls(cond_unet(), SCHEDULE, steps=2)
    x = torch.randn(2, 1, 8, 8)
    y, null = torch.tensor([1, 2]), torch.tensor([10, 10])
    cases = [
        (dict(model_kwargs={"class_labels": torch.tensor([1, 2, 3])}), ValueError, r"model_kwargs\['class_labels'\] must be batched with x along dim 0 \(batch 2\), got batch 3"),
        (dict(model_kwargs={"class_labels": torch.tensor(3)}), ValueError, "got a scalar"),
        (dict(model_kwargs=[("class_labels", y)]), TypeError, "model_kwargs must be a dict"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=2.0), ValueError, "guidance_scale needs uncond_kwargs"),
        (dict(model_kwargs={"class_labels": y}, uncond_kwargs={"class_labels": null}), ValueError, "uncond_kwargs given without guidance_scale"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=float("nan"), uncond_kwargs={"class_labels": null}), ValueError, "guidance_scale must be a finite number"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=float("inf"), uncond_kwargs={"class_labels": null}), ValueError, "guidance_scale must be a finite number"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=2.0, uncond_kwargs={"labels": null}), ValueError, "uncond_kwargs must have model_kwargs's keys"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=2.0, uncond_kwargs={"class_labels": null.int()}), ValueError, r"uncond_kwargs\['class_labels'\] must have model_kwargs\['class_labels'\]'s shape"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=2.0, uncond_kwargs={"class_labels": torch.tensor([10, 10, 10])}), ValueError, "batched with x"),
        (dict(model_kwargs={"class_labels": y}, guidance_scale=2.0, uncond_kwargs={"class_labels": null}, guidance_rescale=1.5), ValueError, r"guidance_rescale must be in \[0, 1\]"),
        (dict(model_kwargs={"class_labels": y}, guidance_rescale=0.5), ValueError, "guidance_rescale needs guidance_scale"),
        (dict(guidance_scale=2.0, uncond_kwargs={}), ValueError, "guidance_scale needs model_kwargs"),
        (dict(model_kwargs={"t": y}), ValueError, "the sampler's own argument"),
        (dict(model_kwargs={"class_labels": y.to("meta")}), ValueError, "is on meta but x is on cpu"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            sampler.sample(x, **kw)
    with pytest.raises(ValueError, match="batched with x"):
        sampler.encode(x, model_kwargs={"class_labels": torch.tensor([1])})


@pytest.mark.skipif(not ops.has_native_kernel("guided_step", "cpu"), reason="counts the native step ops (the extension's CPU kernels are not built)")
def test_ops_per_step_of_labels_and_guidance():
    """What conditioning adds to a lean step: the labels' rows (embedding, add, SiLU, one linear
    for every block's projection); guidance then one copy (x into the doubled batch's second
    half), the combine being inside the one fused step op."""
    from ddim_fast.apps.census.opcount import ops_per_step
    from ddim_fast.apps.quality.train import DIGITS_COND_MODEL_CONFIG, DIGITS_MODEL_CONFIG

    torch.manual_seed(0)
    cond, plain = UNet(**DIGITS_COND_MODEL_CONFIG).eval(), UNet(**DIGITS_MODEL_CONFIG).eval()
    x = torch.randn(2, 1, 16, 16)
    y, null = torch.tensor([1, 2]), torch.tensor([10, 10])
    base, _ = ops_per_step(lambda s: FastSampler(plain, SCHEDULE, steps=s), x)
    labelled, _ = ops_per_step(lambda s: FastSampler(cond, SCHEDULE, steps=s), x, model_kwargs={"class_labels": y})
    guided, _ = ops_per_step(lambda s: FastSampler(cond, SCHEDULE, steps=s), x, model_kwargs={"class_labels": y}, guidance_scale=2.0, uncond_kwargs={"class_labels": null})

    def diff(a, b):
        return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}

    assert diff(base, labelled) == {"aten::embedding": 1, "aten::add.Tensor": 1, "aten::silu": 1, "aten::linear": 1}
    assert diff(labelled, guided) == {"aten::copy_": 1, "ddim_fast::ddim_step": -1, "ddim_fast::guided_step": 1}
