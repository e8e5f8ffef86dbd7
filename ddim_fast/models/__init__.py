"""The models layer: the standard DDPM/DDIM UNet, checkpoint loading, the fusion pass and
the adapters of other model families (diffusers). It imports the ops and base layers only.

    unet             the UNet of the official code (official argument names and state-dict keys)
    presets          the official configurations (cifar10, celeba, lsun)
    checkpoint       state dicts and official training checkpoints, config read off the weights
    fuse             the fusion pass and its rule registry
    unet_rules       the UNet's fusion rules
    diffusers_compat diffusers' blocks (fusion rules) and key mapping, both ways
    prepare          the model as a sampler runs it (fused, cast, channels_last, SDPA)
"""

from . import diffusers_compat, unet_rules  # noqa: F401 - each registers its fusion rules
from .fuse import FusedGroupNormSiLU, fuse_groupnorm_silu, fused_copy, unfuse
from .presets import PRESETS
from .unet import UNet, register_pretrained

__all__ = ["UNet", "PRESETS", "register_pretrained", "FusedGroupNormSiLU", "fuse_groupnorm_silu", "fused_copy", "unfuse"]
