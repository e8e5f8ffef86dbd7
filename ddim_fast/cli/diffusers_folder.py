"""`--model FOLDER`: what diffusers' save_pretrained wrote, and the weights files a user may
pass instead.

A folder is a pipeline's (model_index.json; its unet/ and scheduler/ read from it: a
DDIMPipeline or DDPMPipeline, or any pipeline whose unet is a UNet2DModel) or a
UNet2DModel's own (config.json; the scheduler read from ../scheduler/ when there is one).
The weights are safetensors or bin, as from_pretrained reads them, with nothing
downloaded. A UNet2DModel of the official DDPM structure (google/ddpm-cifar10-32's) becomes
ddim-fast's UNet, same weights (so it samples as a LeanUNet); any other runs as it is.

The schedule and the sampler options come from the scheduler config; one of another
scheduler than DDIMScheduler is read as DDIMScheduler.from_config reads it (what a
DDIMPipeline does with any scheduler it is given), and the command says so.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ..core.checks import describe_error
from ..core.schedule import Schedule
from .args import CLIError

PIPELINES_WITH_A_UNET2D = ("DDIMPipeline", "DDPMPipeline")


def _note(args, msg: str) -> None:
    if args is not None and not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def _read_json(path: str, spec: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"--model {spec!r}: cannot read {path} ({type(e).__name__}: {e})") from None


def load_diffusers_folder(spec: str, device: torch.device, args=None) -> tuple:
    """(model in eval mode on `device`, schedule, description, sampler options)."""
    index = os.path.join(spec, "model_index.json")
    config_path = os.path.join(spec, "config.json")
    if os.path.isfile(index):
        pipeline = _read_json(index, spec).get("_class_name", "a pipeline")
        unet_folder = os.path.join(spec, "unet")
        scheduler_folder = os.path.join(spec, "scheduler")
        what = f"{pipeline} folder {spec!r}"
    elif os.path.isfile(config_path):
        pipeline = None
        unet_folder = spec
        scheduler_folder = os.path.join(os.path.dirname(os.path.abspath(spec)), "scheduler")
        what = f"UNet2DModel folder {spec!r}"
    else:
        raise CLIError(f"--model {spec!r}: a folder, but not one diffusers' save_pretrained wrote (no model_index.json or config.json in it)")
    unet_config = _read_json(os.path.join(unet_folder, "config.json"), spec) if os.path.isfile(os.path.join(unet_folder, "config.json")) else {}
    kind = unet_config.get("_class_name")
    if kind != "UNet2DModel":
        found = f"a {kind}" if kind else "no UNet2DModel config"
        raise CLIError(f"--model {spec!r}: the sample command takes a pixel-space UNet2DModel ({', '.join(PIPELINES_WITH_A_UNET2D)} folders), found {found}; for Stable Diffusion use ddim_fast.accelerate(pipe) in Python")
    try:
        from diffusers import DDIMScheduler, UNet2DModel
    except ImportError:
        raise CLIError(f"--model {spec!r}: reading a diffusers folder needs diffusers (pip install 'ddim-fast[diffusers]')") from None
    try:
        unet = UNet2DModel.from_pretrained(unet_folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise CLIError(f"--model {spec!r}: diffusers cannot load the UNet2DModel in {unet_folder} ({describe_error(e)})") from None
    schedule, options = _folder_schedule(spec, scheduler_folder, DDIMScheduler, args)
    model = _as_our_unet(unet)
    if model is not None:
        what += ", as ddim-fast's UNet"
    else:
        model = unet
    return model.eval().to(device), schedule, what, options


def _folder_schedule(spec: str, scheduler_folder: str, ddim_scheduler, args) -> tuple:
    config_path = os.path.join(scheduler_folder, "scheduler_config.json")
    if not os.path.isfile(config_path):
        _note(args, f"note: --model {spec}: no scheduler config beside the UNet; sampling with the linear schedule (T = 1000) and the command line's grid")
        return Schedule.linear(), {}
    config = _read_json(config_path, spec)
    name = config.get("_class_name", "a scheduler")
    try:
        scheduler = ddim_scheduler.from_config(config)
        schedule_and_options = Schedule.from_diffusers_config(scheduler)
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(f"--model {spec!r}: its scheduler config {config_path}: {e}") from None
    if name != "DDIMScheduler":
        _note(args, f"note: --model {spec}: its {name} config is read as DDIMScheduler.from_config reads it (betas, spacing, clipping, prediction type), as a DDIMPipeline would")
    return schedule_and_options


def _as_our_unet(unet2d):
    """ddim-fast's UNet with unet2d's weights when unet2d is the official DDPM structure (the
    one models.diffusers_compat.unet2d_config builds, every setting the same), else None."""
    from ..models.diffusers_compat import from_diffusers, unet2d_config

    try:
        ours = from_diffusers(unet2d)
    except (ValueError, KeyError, RuntimeError, ZeroDivisionError, TypeError, AttributeError):
        return None
    expected = unet2d_config(ours.config)

    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    config = unet2d.config
    for key, value in expected.items():
        if plain(getattr(config, key, None)) != plain(value):
            return None
    return ours


def read_weights_file(spec: str):
    """The object in a torch checkpoint (weights_only) or a safetensors file (its state dict)."""
    if spec.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CLIError(f"--model {spec!r}: reading a .safetensors file needs safetensors (pip install safetensors)") from None
        try:
            return load_file(spec)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a bad argument here
            raise CLIError(f"--model {spec!r}: cannot read it as safetensors ({describe_error(e)})") from None
    try:
        return torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad argument here
        raise CLIError(f"--model {spec!r}: cannot read it as a torch checkpoint ({describe_error(e)})") from None


_DIFFUSERS_KEYS = ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "conv_norm_out.")


def check_not_diffusers_state(spec: str, state: dict) -> None:
    """A CLIError for a diffusers UNet state dict, which needs its config.json to be built."""
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith(_DIFFUSERS_KEYS) for k in keys):
        example = next(k for k in keys if k.startswith(_DIFFUSERS_KEYS))
        raise CLIError(
            f"--model {spec!r} holds a diffusers UNet state dict (keys such as {example!r}), which does not say the UNet's structure: "
            "pass the folder that save_pretrained wrote (the weights with their config.json, or the pipeline folder), "
            "or convert it with ddim_fast.models.diffusers_compat.diffusers_to_official and pass --config"
        )
