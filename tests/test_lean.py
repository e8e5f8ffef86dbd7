"""The lean UNet (models/lean.py): the UNet's function in fewer ops, and what one step dispatches."""

import copy

import pytest
import torch
import torch.nn as nn
from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet
from ddim_fast.apps.census.opcount import COPIES, ops_per_step
from ddim_fast.models.lean import LeanUNet, is_lean_convertible
from ddim_fast.models.unet import ResnetBlock

from .conftest import max_err, tiny_unet

SCHEDULE = Schedule.linear()

CONFIGS = [
    dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=1, out_ch=1, resolution=8),  # the tests' tiny UNet
    dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.1, in_channels=3, out_ch=3, resolution=16),  # CIFAR-10's layout, small
    dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(16, 4), dropout=0.1, in_channels=1, out_ch=2, resolution=16, resamp_with_conv=False),  # attention at two levels, pooling and nearest resampling
    dict(ch=64, ch_mult=(2,), num_res_blocks=3, attn_resolutions=(), dropout=0.0, in_channels=2, out_ch=2, resolution=6),  # one level, no attention: shortcuts only in the up path
]


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = UNet(**cfg).eval()
    with torch.no_grad():  # random init gives a near-zero head: scale it so errors show
        m.conv_out.weight.mul_(20.0)
        for p in m.parameters():  # and non-trivial GroupNorm affines
            if p.dim() == 1 and torch.all(p == 1):
                p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tiny", "cifar-layout", "pool-attn2", "one-level"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_lean_equals_the_unet_in_float64(cfg, channels_last):
    model = _model(cfg).double()
    lean = LeanUNet.from_unet(model, channels_last=channels_last)
    g = torch.Generator().manual_seed(1)
    r = cfg["resolution"]
    x = torch.randn(3, cfg["in_channels"], r, r, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        ref = model(x, t)
        out = lean(x, t)  # per-sample time rows
        table = lean.time_table([999, 417, 0])
        row = lean.forward_rows(x, table[1])  # one row for the batch, as the sampler passes it
        ref_row = model(x, torch.full((3,), 417))
    scale = ref.abs().max().item()
    assert scale > 1
    assert max_err(out, ref) < 1e-12 * scale
    assert max_err(row, ref_row) < 1e-12 * scale
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.dtype == torch.float64


def test_time_table_is_made_once_per_plan():
    lean = LeanUNet.from_unet(tiny_unet())
    a = lean.time_table([999, 500, 1])
    assert a.shape == (3, lean.table_width) and a.dtype == torch.float32
    assert lean.time_table((999, 500, 1)) is a  # cached
    for i in range(10):  # a bounded cache: old plans go
        lean.time_table([i])
    assert lean.time_table([999, 500, 1]) is not a
    torch.testing.assert_close(lean.time_table([999, 500, 1]), a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_low_precision_tracks_float64_like_the_unet(dtype):
    """The lean model in bf16/fp16 is as close to the float64 UNet as the UNet itself run
    in that dtype (a factor 2 for different rounding)."""
    model = _model(CONFIGS[1])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), t)
        own = max_err(copy.deepcopy(model).to(dtype)(x.to(dtype), t), ref)
        lean = LeanUNet.from_unet(model, dtype=dtype)
        out = lean(x.to(dtype).contiguous(memory_format=torch.channels_last), t)
    assert out.dtype == dtype
    assert max_err(out, ref) <= 2 * own + 1e-3 * ref.abs().max().item()


class _MyBlock(ResnetBlock):
    pass


def test_what_the_lean_rewrite_leaves_alone():
    assert is_lean_convertible(tiny_unet())
    subclassed = tiny_unet()
    b = subclassed.down[0].block[0]
    swapped = _MyBlock(in_channels=b.in_channels, out_channels=b.out_channels, dropout=0.0, temb_channels=b.temb_proj.in_features)
    subclassed.down[0].block[0] = swapped
    assert not is_lean_convertible(subclassed)
    no_affine = tiny_unet()
    no_affine.norm_out = nn.GroupNorm(32, no_affine.norm_out.num_channels, affine=False)
    assert not is_lean_convertible(no_affine)

    class Wrapped(UNet):
        pass

    assert not is_lean_convertible(Wrapped(**CONFIGS[0]))
    with pytest.raises(TypeError, match="LeanUNet rewrites ddim_fast's UNet"):
        LeanUNet.from_unet(subclassed)
    # FastSampler runs such models as fused copies instead, with the same samples
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = FastSampler(subclassed, SCHEDULE, steps=3)
    out = sampler.sample(x_T)
    assert not isinstance(sampler.prepared_model(x_T.device), LeanUNet)
    torch.testing.assert_close(out, ReferenceSampler(subclassed, SCHEDULE, steps=3).sample(x_T), rtol=1e-4, atol=1e-4)


def test_fast_sampler_runs_the_lean_model_by_default():
    model = tiny_unet()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    lean = FastSampler(model, SCHEDULE, steps=4, eta=0.5)
    classic = FastSampler(model, SCHEDULE, steps=4, eta=0.5, lean=False)
    a = lean.sample(x_T, generator=torch.Generator().manual_seed(1))
    b = classic.sample(x_T, generator=torch.Generator().manual_seed(1))
    assert isinstance(lean.prepared_model(x_T.device), LeanUNet)
    assert not isinstance(classic.prepared_model(x_T.device), LeanUNet)
    assert lean.fused_sites == classic.fused_sites == 17
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="lean must be True or False"):
        FastSampler(model, SCHEDULE, lean="yes")


# --- what one step dispatches (the GPU's kernel count, counted on the CPU) -----------------

@pytest.mark.slow
def test_one_step_of_the_cifar10_unet_in_bf16_is_at_most_160_ops():
    """The issue's budget: at most 160 non-view ops per step on the CIFAR-10 UNet in bf16
    channels_last (289 before the lean model), no copies or casts, every 4-d activation
    channels_last. Each op here is a GPU kernel there."""
    torch.manual_seed(0)
    model = UNet.from_config("cifar10").eval()
    x_T = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    per_step, not_cl = ops_per_step(lambda s: FastSampler(model, SCHEDULE, steps=s, dtype="bf16", channels_last=True), x_T)
    total = sum(per_step.values())
    assert total <= 160, f"{total} ops per step: {sorted(per_step.items(), key=lambda kv: -kv[1])}"
    assert not COPIES & set(per_step), {k: per_step[k] for k in COPIES & set(per_step)}
    assert not not_cl, f"ops taking or making 4-d tensors that are not channels_last, per step: {not_cl}"
    assert per_step["ddim_fast::ddim_step"] == 1


def test_the_op_counter_counts():
    """A check of the checker: the classic fused path dispatches the ops it is known to."""
    model = tiny_unet()
    x_T = torch.randn(1, 1, 8, 8)
    classic, _ = ops_per_step(lambda s: FastSampler(model, SCHEDULE, steps=s, lean=False), x_T)
    lean, _ = ops_per_step(lambda s: FastSampler(model, SCHEDULE, steps=s), x_T)
    assert classic["aten::linear"] == 10 and classic["aten::silu"] == 9  # 8 blocks' temb_proj (and SiLU) + the MLP's
    assert "aten::linear" not in lean and "aten::silu" not in lean
    assert "aten::dropout" not in classic and "aten::dropout" not in lean  # an eval-mode copy has none
    assert sum(lean.values()) < sum(classic.values()) - 30
    _, not_cl = ops_per_step(lambda s: FastSampler(model, SCHEDULE, steps=s, channels_last=False), x_T)
    assert not_cl  # NCHW activations are seen
