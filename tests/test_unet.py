"""The standard UNet: parameter counts, official key names, shapes, checkpoint loading."""

import pytest
import torch

from ddim_fast import UNet
from ddim_fast.models.unet import get_timestep_embedding

from .conftest import tiny_unet


@pytest.mark.parametrize("preset, millions", [("cifar10", 35.746307), ("celeba", 78.700803), ("lsun", 113.673219)])
def test_preset_parameter_counts(preset, millions):
    model = UNet.from_config(preset)
    assert sum(p.numel() for p in model.parameters()) == round(millions * 1e6)


def test_official_state_dict_keys():
    keys = set(UNet.from_config("cifar10").state_dict())
    for k in [
        "temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight",
        "down.0.block.0.norm1.weight", "down.0.block.0.conv1.weight", "down.0.block.0.temb_proj.weight",
        "down.0.block.0.norm2.bias", "down.0.block.0.conv2.weight", "down.1.block.0.nin_shortcut.weight",
        "down.1.attn.0.q.weight", "down.1.attn.1.proj_out.bias", "down.0.downsample.conv.weight",
        "mid.block_1.norm1.weight", "mid.attn_1.k.weight", "mid.block_2.conv2.bias",
        "up.3.block.2.nin_shortcut.weight", "up.1.attn.2.v.weight", "up.3.upsample.conv.weight",
        "norm_out.weight", "conv_out.bias",
    ]:
        assert k in keys, k
    assert not any(k.startswith("down.3.downsample") or k.startswith("up.0.upsample") for k in keys)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_and_timestep_dtypes(batch):
    model = tiny_unet(in_channels=3, resolution=8)
    x = torch.randn(batch, 3, 8, 8)
    with torch.no_grad():
        a = model(x, torch.full((batch,), 10, dtype=torch.long))
        b = model(x, torch.full((batch,), 10.0))  # the official code passes float timesteps
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x must be \(B, 1, 8, 8\), got \(1, 1, 9, 9\)"):
        tiny_unet()(torch.randn(1, 1, 9, 9), torch.zeros(1, dtype=torch.long))


def test_timestep_embedding_is_sinusoidal():
    t = torch.tensor([0, 1, 999])
    e = get_timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    torch.testing.assert_close(e[:, :4], torch.sin(t[:, None].float() * freqs))
    torch.testing.assert_close(e[:, 4:], torch.cos(t[:, None].float() * freqs))
    assert get_timestep_embedding(t, 7).shape == (3, 7)


def test_attention_sdpa_matches_the_official_formula():
    model = tiny_unet(in_channels=3, resolution=8)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        a = model(x, t)
        for m in model.modules():
            if hasattr(m, "use_sdpa"):
                m.use_sdpa = True
        b = model(x, t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_attention_path_matches():
    model = tiny_unet(in_channels=3, resolution=8)
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 600])
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        a = tiny_unet(in_channels=3, resolution=8)(x, t)
        b = cl(x.contiguous(memory_format=torch.channels_last), t)
    # the two layouts take different conv algorithms: fp32 rounding relative to the output's
    # scale (seen up to 2.3e-6 over 200 inputs; an element-wise rtol failed 1 in ~40 runs)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * a.abs().max().item())


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet(ch=48)
    with pytest.raises(ValueError, match="unknown UNet preset 'imagenet'"):
        UNet.from_config("imagenet")
    with pytest.raises(ValueError, match="divisible"):
        UNet(ch=32, ch_mult=(1, 2, 2), resolution=6)


def test_from_config_takes_the_official_yaml_layout():
    cfg = {"model": {"ch": 32, "out_ch": 1, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0, "in_channels": 1, "resamp_with_conv": True, "var_type": "fixedlarge", "ema": True}, "data": {"image_size": 8}}
    model = UNet.from_config(cfg)
    assert model.resolution == 8 and model.in_channels == 1


def test_from_checkpoint_bare_and_official_list(tmp_path):
    cfg = dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=1, resolution=8)
    src = tiny_unet(seed=1)
    ema = tiny_unet(seed=2)
    bare = tmp_path / "model.ckpt"
    torch.save(src.state_dict(), bare)
    loaded = UNet.from_checkpoint(bare, config=cfg)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    # the official training checkpoint: [states ('module.'), optimizer, epoch, step, ema]
    states = {"module." + k: v for k, v in src.state_dict().items()}
    shadow = {"module." + k: v for k, v in ema.state_dict().items()}
    ckpt = tmp_path / "ckpt.pth"
    torch.save([states, {"state": {}, "param_groups": []}, 7, 1000, shadow], ckpt)
    got = UNet.from_checkpoint(ckpt, config=cfg)
    torch.testing.assert_close(got.conv_out.weight, ema.conv_out.weight)  # EMA preferred
    got = UNet.from_checkpoint(ckpt, config=cfg, prefer_ema=False)
    torch.testing.assert_close(got.conv_out.weight, src.conv_out.weight)


def test_from_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        UNet.from_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    torch.save({"conv_in.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"does not fit UNet\(ch=128.*327 missing keys: temb.dense.0.weight"):
        UNet.from_checkpoint(bad, config="cifar10")
    small = tmp_path / "small.ckpt"
    torch.save(tiny_unet().state_dict(), small)
    with pytest.raises(ValueError, match="matches none of the presets"):
        UNet.from_checkpoint(small)
    with pytest.raises(ValueError, match=r"shape mismatches: conv_in.weight: checkpoint \(32, 1, 3, 3\) vs model \(32, 3, 3, 3\)"):
        UNet.from_checkpoint(small, config=dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=3, resolution=8))


@pytest.mark.parametrize("preset", ["cifar10", "celeba"])
def test_config_is_read_off_the_weights(tmp_path, preset):
    src = UNet.from_config(preset)
    path = tmp_path / "model.ckpt"
    torch.save([{"module." + k: v for k, v in src.state_dict().items()}, {}, 1, 2], path)  # no EMA entry
    got = UNet.from_checkpoint(path)
    assert got.config == src.config
    torch.testing.assert_close(got.conv_out.weight, src.conv_out.weight)
