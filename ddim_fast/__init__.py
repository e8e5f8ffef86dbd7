"""ddim-fast: fast DDIM sampling (Song, Meng & Ermon, ICLR 2021) for standard PyTorch UNets.

    from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet

    schedule = Schedule.linear()
    model = UNet.from_config("cifar10").eval()
    x0 = FastSampler(model, schedule, steps=50).sample(batch_size=16, generator=g)
"""

from . import ops
from ._ext import backends
from ._sampling import SamplerOutput
from .fast import FastSampler
from .reference import ReferenceSampler
from .schedule import Schedule
from .unet import UNet
from .version import __version__

__all__ = ["FastSampler", "ReferenceSampler", "Schedule", "UNet", "SamplerOutput", "ops", "backends", "__version__"]
