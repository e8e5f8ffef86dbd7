"""diffusers interoperability: schedules, parity with diffusers' DDIM loop, the fusion pass
on UNet2DModel, and the key mapping both ways. Skipped without diffusers."""

import copy

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule
from ddim_fast.models.fuse import FusedGroupNormSiLU, fuse_groupnorm_silu, unfuse

from .conftest import max_err, tiny_unet

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddim-fast[diffusers])")
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

from ddim_fast.models.diffusers_compat import diffusers_to_official, from_diffusers, official_to_diffusers, to_diffusers  # noqa: E402


def _unet2d(seed=0):
    torch.manual_seed(seed)
    m = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=32, attention_head_dim=None).eval()
    with torch.no_grad():
        m.conv_out.weight.mul_(10)
    return m


def _diffusers_loop(unet, scheduler, x, steps, eta, generator=None, use_clipped_model_output=False):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(x, t).sample
        x = scheduler.step(out, t, x, eta=eta, generator=generator, use_clipped_model_output=use_clipped_model_output).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("cfg", [
    dict(),  # diffusers' defaults: clip_sample=True, set_alpha_to_one=True, leading
    dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
])
@pytest.mark.parametrize("cls", [ReferenceSampler, FastSampler])
def test_our_samplers_match_diffusers_ddim_loop(eta, cfg, cls):
    unet = _unet2d()
    scheduler = DDIMScheduler(num_train_timesteps=1000, **cfg)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_loop(unet, scheduler, x_T.clone(), 10, eta, generator=torch.Generator().manual_seed(1))
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    got = cls(unet, schedule, steps=10, eta=eta, **options).sample(x_T, generator=torch.Generator().manual_seed(1))
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item())


def test_schedule_from_diffusers_config_matches_its_alphas():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False)
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    assert schedule.final_alpha_cumprod == pytest.approx(float(scheduler.alphas_cumprod[0]), rel=1e-6)
    assert options == dict(skip="leading", steps_offset=0, clip_x0=1.0, prediction="eps")
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        Schedule.from_diffusers_config({"thresholding": True})


def test_fusion_pass_on_unet2dmodel():
    unet = _unet2d()
    fused = copy.deepcopy(unet)
    n = fuse_groupnorm_silu(fused)
    blocks = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
    assert n == 2 * blocks + 1  # norm1 and norm2 of each ResnetBlock2D, and the output head
    for m in fused.modules():
        if type(m).__name__ == "ResnetBlock2D":
            assert isinstance(m.nonlinearity, torch.nn.SiLU)  # the time path keeps its SiLU
            assert isinstance(m.norm1, FusedGroupNormSiLU)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t).sample, unet(x, t).sample, rtol=1e-4, atol=1e-4)
    assert list(fused.state_dict()) == list(unet.state_dict())
    unfuse(fused)
    assert not any(isinstance(m, FusedGroupNormSiLU) for m in fused.modules())
    assert not any("forward" in m.__dict__ for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t).sample, unet(x, t).sample)


def test_fast_sampler_fuses_a_unet2dmodel():
    unet = _unet2d()
    sampler = FastSampler(unet, Schedule.linear(), steps=3)
    sampler.sample(batch_size=1)
    assert sampler.fused_sites == 2 * sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D") + 1
    assert not any(isinstance(m, FusedGroupNormSiLU) for m in unet.modules())


def test_key_mapping_both_ways_gives_the_same_model():
    ours = tiny_unet(in_channels=3, resolution=8)
    theirs = to_diffusers(ours).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 800])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t).sample, ours(x, t), rtol=1e-4, atol=1e-4)
    back = from_diffusers(theirs).eval()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    sd = ours.state_dict()
    assert diffusers_to_official(official_to_diffusers(sd)).keys() == sd.keys()


# --- time embeddings from a table (models/diffusers_lean.py) ----------------------------------


def test_fast_sampler_tables_the_time_embeddings_of_unet2d():
    from ddim_fast.models.diffusers_lean import TabledUNet2D

    from ddim_fast.apps.census.opcount import ops_per_step

    unet = _unet2d()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = FastSampler(unet, Schedule.linear(), steps=4, eta=0.5)
    got = sampler.sample(x_T, generator=torch.Generator().manual_seed(1))
    assert isinstance(sampler.prepared_model(x_T.device), TabledUNet2D)
    assert type(unet.time_proj).__name__ == "Timesteps"  # the caller's model is as it was
    ref = ReferenceSampler(unet, Schedule.linear(), steps=4, eta=0.5).sample(x_T, generator=torch.Generator().manual_seed(1))
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())
    tabled, _ = ops_per_step(lambda s: FastSampler(unet, Schedule.linear(), steps=s), x_T)
    untabled, _ = ops_per_step(lambda s: FastSampler(unet, Schedule.linear(), steps=s, lean=False), x_T)
    for op in ("aten::silu", "aten::dropout", "aten::exp", "aten::sin", "aten::cos", "aten::arange.start"):
        assert op not in tabled, (op, tabled)
    # 8 ResNet blocks' time projections and the MLP's two linears are gone; 16 are attention's q, k, v, out
    assert untabled["aten::linear"] - tabled["aten::linear"] == 10 and tabled["aten::linear"] == 16


def test_unet2d_that_cannot_be_tabled_runs_as_a_fused_copy():
    from ddim_fast.models.diffusers_lean import TabledUNet2D

    torch.manual_seed(0)
    classy = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                         down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=32, num_class_embeds=4).eval()
    scaled = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                         down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=32,
                         resnet_time_scale_shift="scale_shift").eval()
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = FastSampler(scaled, Schedule.linear(), steps=3)
    out = sampler.sample(x_T)
    assert not isinstance(sampler.prepared_model(x_T.device), TabledUNet2D)
    torch.testing.assert_close(out, ReferenceSampler(scaled, Schedule.linear(), steps=3).sample(x_T), rtol=1e-4, atol=1e-4)
    from ddim_fast.models.diffusers_lean import is_tableable
    from ddim_fast.models.fuse import fused_copy

    assert not is_tableable(fused_copy(classy)[0]) and not is_tableable(fused_copy(scaled)[0])
    assert is_tableable(fused_copy(_unet2d())[0]) and not is_tableable(_unet2d())  # fused first


# --- conditional models and classifier-free guidance ------------------------------------------


def _unet2d_condition(seed=0):
    """A tiny Stable-Diffusion-shaped UNet2DConditionModel (cross-attention to a 5x16 context)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                             cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32).eval()
    with torch.no_grad():
        m.conv_out.weight.mul_(10)
    return m


def _diffusers_guided_loop(unet, scheduler, x, steps, w, cond, uncond):
    """diffusers' pipelines' loop: one call on [x, x] with [uncond, cond], ε_u + w (ε_c − ε_u), DDIMScheduler.step."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(torch.cat([x, x]), t, **{k: torch.cat([uncond[k], cond[k]]) for k in cond}).sample
        eps_u, eps_c = out.chunk(2)
        x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("cls", [ReferenceSampler, FastSampler])
def test_guided_sampling_of_unet2dcondition_matches_diffusers_loop(cls):
    unet = _unet2d_condition()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))}
    uncond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))}
    expected = _diffusers_guided_loop(unet, scheduler, x_T.clone(), 10, 7.5, cond, uncond)
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    sampler = cls(unet, schedule, steps=10, **options)
    got = sampler.sample(x_T, model_kwargs=cond, guidance_scale=7.5, uncond_kwargs=uncond)
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item())
    if cls is FastSampler:
        blocks = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
        assert sampler.fused_sites == 2 * blocks + 1  # every ResnetBlock2D and the head; attention as it is


@pytest.mark.parametrize("cls", [ReferenceSampler, FastSampler])
def test_class_conditional_unet2dmodel_takes_class_labels(cls):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=32, attention_head_dim=None, num_class_embeds=4).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(10)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1])
    scheduler.set_timesteps(10)
    expected = x_T.clone()
    for t in scheduler.timesteps:
        with torch.no_grad():
            expected = scheduler.step(unet(expected, t, class_labels=labels).sample, t, expected, eta=0.0).prev_sample
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    got = cls(unet, schedule, steps=10, **options).sample(x_T, model_kwargs={"class_labels": labels})
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item())
    unlabelled = cls(unet, schedule, steps=10, **options).sample(x_T, model_kwargs={"class_labels": torch.tensor([2, 2, 2])})
    assert max_err(unlabelled, expected) > 1e-3  # the labels reached the model


def test_fusion_pass_on_unet2dcondition():
    unet = _unet2d_condition()
    fused = copy.deepcopy(unet)
    n = fuse_groupnorm_silu(fused)
    assert n == 2 * sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D") + 1
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, encoder_hidden_states=c).sample, unet(x, t, encoder_hidden_states=c).sample, rtol=1e-4, atol=1e-4)
    assert list(fused.state_dict()) == list(unet.state_dict())


def test_fast_sampler_tables_the_time_embeddings_of_unet2dcondition():
    """An SD-shaped UNet that the lean rewrite (models/sd_lean.py) does not fit (here: a
    custom attention processor) runs as a TabledUNet2D (its embedding depends on t alone),
    with the conditioning passed through; per step its time MLP and every ResNet block's
    time projection are gone (cross-attention's linears stay)."""
    from diffusers.models.attention_processor import AttnProcessor

    from ddim_fast.apps.census.opcount import ops_per_step
    from ddim_fast.models.diffusers_lean import TabledUNet2D

    unet = _unet2d_condition()
    unet.set_attn_processor(AttnProcessor())
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(model_kwargs={"encoder_hidden_states": torch.randn(2, 5, 16)}, guidance_scale=3.0, uncond_kwargs={"encoder_hidden_states": torch.zeros(2, 5, 16)})
    sampler = FastSampler(unet, Schedule.linear(), steps=4)
    got = sampler.sample(x_T, **kw)
    assert isinstance(sampler.prepared_model(x_T.device), TabledUNet2D)
    ref = ReferenceSampler(unet, Schedule.linear(), steps=4).sample(x_T, **kw)
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())
    tabled, _ = ops_per_step(lambda s: FastSampler(unet, Schedule.linear(), steps=s), x_T, **kw)
    untabled, _ = ops_per_step(lambda s: FastSampler(unet, Schedule.linear(), steps=s, lean=False), x_T, **kw)
    blocks = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
    assert untabled["aten::linear"] - tabled["aten::linear"] == blocks + 2  # each block's projection and the MLP's two
    for op in ("aten::exp", "aten::sin", "aten::cos"):
        assert op not in tabled, (op, tabled)
    sdxl_like = _unet2d_condition()
    sdxl_like.time_embed_act = torch.nn.SiLU()  # an activation after the MLP: not a function the table can hold as it is
    from ddim_fast.models.diffusers_lean import is_tableable
    from ddim_fast.models.fuse import fused_copy

    assert is_tableable(fused_copy(_unet2d_condition())[0]) and not is_tableable(fused_copy(sdxl_like)[0])
