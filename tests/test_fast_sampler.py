"""FastSampler on the CPU: the same samples as ReferenceSampler, to float rounding."""

import copy

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, SamplerOutput, Schedule
from ddim_fast.models.fuse import FusedGroupNormSiLU

from .conftest import CastModel, max_err, tiny_unet

SCHEDULE = Schedule.linear()


def _agree(fast, ref32, ref64, factor=2.0, rtol=1e-5):
    """fast is as close to the fp64 truth as fp32 rounding allows: within `factor` times
    the reference's own fp32 error, plus rtol of the scale. Different but equally exact
    fp32 kernels (channels_last convolutions, the fused GroupNorm) round differently, and
    the x0 prediction divides by sqrt(alpha_t), which amplifies rounding at large t; with
    a clamp, a rounding difference can also flip which side of the bound an element takes
    (rtol 1e-3 there). A wrong coefficient or noise draw gives errors of order 0.1-1."""
    own = max_err(ref32, ref64)
    scale = ref64.abs().max().item()
    assert max_err(fast, ref64) <= factor * own + rtol * (1 + scale), (max_err(fast, ref64), own, scale)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, "ddpm_noisy"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_fast_equals_reference(eta, clip, prediction):
    model = tiny_unet()
    model64 = copy.deepcopy(model).double()
    kw = dict(steps=5, eta=eta, clip_x0=clip, prediction=prediction)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref32 = ReferenceSampler(model, SCHEDULE, **kw).sample(x_T, generator=torch.Generator().manual_seed(1))
    ref64 = ReferenceSampler(model64, SCHEDULE, **kw).sample(x_T.double(), generator=torch.Generator().manual_seed(1))
    fast = FastSampler(model, SCHEDULE, **kw).sample(x_T, generator=torch.Generator().manual_seed(1))
    assert fast.dtype == torch.float32 and fast.shape == x_T.shape
    _agree(fast, ref32, ref64, rtol=1e-3 if clip else 1e-5)


@pytest.mark.parametrize("opts", [dict(fuse=False), dict(channels_last=False), dict(channels_last=True), dict(fuse="inplace"), dict(backend="torch")])
def test_fast_options_do_not_change_the_samples(opts):
    model = tiny_unet()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=4, eta=0.7)
    ref32 = ReferenceSampler(model, SCHEDULE, **kw).sample(x_T, generator=torch.Generator().manual_seed(2))
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, **kw).sample(x_T.double(), generator=torch.Generator().manual_seed(2))
    fast = FastSampler(model, SCHEDULE, **kw, **opts).sample(x_T, generator=torch.Generator().manual_seed(2))
    _agree(fast, ref32, ref64)


def test_fast_draws_x_T_like_the_reference():
    model = tiny_unet()
    a = FastSampler(model, SCHEDULE, steps=3).sample(batch_size=2, generator=torch.Generator().manual_seed(9))
    b = ReferenceSampler(model, SCHEDULE, steps=3).sample(batch_size=2, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_callers_model_is_left_as_it_was():
    model = tiny_unet()
    before = {n: p for n, p in model.named_parameters()}
    sampler = FastSampler(model, SCHEDULE, steps=3)
    sampler.sample(batch_size=1)
    assert sampler.fused_sites == 17  # 8 ResnetBlocks x 2 + the output head
    assert not any(isinstance(m, FusedGroupNormSiLU) for m in model.modules())
    for n, p in model.named_parameters():
        assert p is before[n] and p.is_contiguous()


def test_fuse_inplace_changes_the_callers_model():
    model = tiny_unet()
    FastSampler(model, SCHEDULE, steps=2, fuse="inplace", channels_last=False).sample(batch_size=1)
    assert sum(isinstance(m, FusedGroupNormSiLU) for m in model.modules()) == 17


def test_encode_equals_reference():
    model = tiny_unet()
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref32 = ReferenceSampler(model, SCHEDULE, steps=6).encode(x0)
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, steps=6).encode(x0.double())
    fast = FastSampler(model, SCHEDULE, steps=6).encode(x0)
    _agree(fast, ref32, ref64)
    fast_traj = FastSampler(model, SCHEDULE, steps=6).encode(x0, return_trajectory=True)
    assert len(fast_traj[1]) == 7
    torch.testing.assert_close(fast_traj[0], fast)


def test_x0_preds_and_trajectory_match_the_reference():
    model = tiny_unet()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=4, eta=0.5, clip_x0=True)
    r = ReferenceSampler(model, SCHEDULE, **kw).sample(x_T, generator=torch.Generator().manual_seed(1), return_x0=True, return_trajectory=True)
    f = FastSampler(model, SCHEDULE, **kw).sample(x_T, generator=torch.Generator().manual_seed(1), return_x0=True, return_trajectory=True)
    assert isinstance(f, SamplerOutput)
    assert len(f.x0_preds) == 4 and len(f.trajectory) == 5
    for a, b in zip(f.x0_preds + f.trajectory, r.x0_preds + r.trajectory):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(f.trajectory[-1], f.sample)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sampling_tracks_the_reference(dtype):
    model = tiny_unet()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=4, eta=0.0)
    ref64 = ReferenceSampler(copy.deepcopy(model).double(), SCHEDULE, **kw).sample(x_T.double())
    ref_lp = ReferenceSampler(CastModel(model, dtype), SCHEDULE, **kw).sample(x_T)
    fast = FastSampler(model, SCHEDULE, **kw, dtype=dtype).sample(x_T)
    assert fast.dtype == dtype
    assert model.conv_in.weight.dtype == torch.float32  # the caller's model is not cast
    own = max_err(ref_lp, ref64)
    assert 0 < own < 0.1 * ref64.abs().max().item()
    # the sampler state itself is stored in `dtype`: allow that rounding on top
    assert max_err(fast, ref64) <= 2 * own + torch.finfo(dtype).eps * ref64.abs().max().item()


def test_empty_batch_returns_empty():
    out = FastSampler(tiny_unet(), SCHEDULE, steps=3).sample(torch.empty(0, 1, 8, 8))
    assert out.shape == (0, 1, 8, 8)
    out = ReferenceSampler(tiny_unet(), SCHEDULE, steps=3).sample(torch.empty(0, 1, 8, 8))
    assert out.shape == (0, 1, 8, 8)


def test_sampler_reuse_gives_the_same_result():
    model = tiny_unet()
    s = FastSampler(model, SCHEDULE, steps=3, eta=1.0)
    a = s.sample(batch_size=2, generator=torch.Generator().manual_seed(3))
    b = s.sample(batch_size=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
