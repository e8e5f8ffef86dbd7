"""The GroupNorm+SiLU fusion pass: same outputs, same keys, reversible, still trainable."""

import copy

import pytest
import torch
import torch.nn as nn

from ddim_fast.models.fuse import FusedGroupNormSiLU, fuse_groupnorm_silu, fused_copy, unfuse

from .conftest import tiny_unet


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 0.05)])
def test_fused_unet_gives_the_same_outputs(channels_last, dtype, tol):
    model = tiny_unet(in_channels=3).to(dtype)
    fused = copy.deepcopy(model)
    assert fuse_groupnorm_silu(fused) == 17  # 8 ResnetBlocks x (norm1, norm2 + temb bias) + the head
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 500, 999])
    with torch.inference_mode():
        a, b = model(x, t), fused(x, t)
    scale = a.abs().max().item()
    assert (a.float() - b.float()).abs().max().item() <= tol * max(1.0, scale)


def test_fusion_keeps_keys_and_shares_parameters():
    model = tiny_unet()
    keys = list(model.state_dict())
    clone, n = fused_copy(model)
    assert n == 17 and list(clone.state_dict()) == keys
    assert clone.down[0].block[0].norm1.weight is model.down[0].block[0].norm1.weight
    assert not any(isinstance(m, FusedGroupNormSiLU) for m in model.modules())
    assert fuse_groupnorm_silu(clone) == 0  # idempotent


def test_unfuse_restores_the_original_modules():
    model = tiny_unet()
    norm1 = model.mid.block_1.norm1
    fuse_groupnorm_silu(model)
    assert isinstance(model.mid.block_1.norm1, FusedGroupNormSiLU)
    assert isinstance(model.mid.block_1.act1, nn.Identity)
    assert unfuse(model) == 34
    assert model.mid.block_1.norm1 is norm1 and isinstance(model.mid.block_1.act1, nn.SiLU)
    assert not any(isinstance(m, FusedGroupNormSiLU) for m in model.modules())


def test_sequential_pairs_are_fused():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.ReLU())
    ref = copy.deepcopy(seq)
    assert fuse_groupnorm_silu(seq) == 1  # GroupNorm -> ReLU is not a site
    x = torch.randn(2, 3, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_fused_model_still_trains():
    model = tiny_unet()
    fused = copy.deepcopy(model)
    fuse_groupnorm_silu(fused)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    model(x, t).square().mean().backward()
    fused(x, t).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
