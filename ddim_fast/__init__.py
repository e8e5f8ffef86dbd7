"""ddim-fast: fast DDIM sampling (Song, Meng & Ermon, ICLR 2021) for standard PyTorch UNets.

    from ddim_fast import FastSampler, ReferenceSampler, Schedule, UNet

    schedule = Schedule.linear()
    model = UNet.from_config("cifar10").eval()
    x0 = FastSampler(model, schedule, steps=50).sample(batch_size=16, generator=g)

    fast = ddim_fast.accelerate(pipe)   # a diffusers DDIMPipeline or StableDiffusionPipeline
    images = fast("a cat", num_inference_steps=50, generator=g).images

The package is layered; each layer imports only the ones before it (tests/test_layers.py
checks it):

    core      schedules, timestep grids, step plans, argument checks (no torch.nn)
    kernels   the Triton kernels, one family per file
    ops       the fused operators: dispatch, the native extension, fake kernels, fallbacks
    models    the UNet, checkpoints, the fusion pass and its rules, diffusers adapters
    sampling  ReferenceSampler, FastSampler and the captured CUDA-graph loop
    apps      embedded models and data, quality metric, training, sharded generation
    cli       the ddim-fast command line
"""

from . import ops
from .apps import pretrained as _pretrained  # noqa: F401 - registers the embedded models with UNet.from_pretrained
from .apps.pipelines import accelerate
from .core.schedule import Schedule
from .models.unet import UNet
from .ops import backends
from .sampling import FastSampler, ReferenceSampler, SamplerOutput
from .version import __version__

__all__ = ["accelerate", "FastSampler", "ReferenceSampler", "Schedule", "UNet", "SamplerOutput", "ops", "backends", "__version__"]
