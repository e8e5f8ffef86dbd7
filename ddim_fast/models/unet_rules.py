"""The fusion rules of ddim_fast's UNet (models/unet.py), registered with the pass (models/fuse.py).

- ResnetBlock: norm1 -> act1, and norm2(h + temb_proj(...)) -> act2, the time-embedding
  bias add joining the fused kernel;
- UNet: the output head norm_out -> act_out.
"""

from __future__ import annotations

import torch.nn as nn

from .fuse import fuse_pair, register_rule
from .unet import GroupNorm, ResnetBlock, UNet

_NORMS = (nn.GroupNorm, GroupNorm)  # GroupNorm: nn.GroupNorm that can add a bias first


def _fuse_resnet(block: ResnetBlock) -> int:
    return fuse_pair(block, "norm1", "act1", _NORMS) + fuse_pair(block, "norm2", "act2", _NORMS)


def _fuse_head(unet: UNet) -> int:
    return int(fuse_pair(unet, "norm_out", "act_out", _NORMS))


register_rule(ResnetBlock, _fuse_resnet)
register_rule(UNet, _fuse_head)
