"""What the commands share: the device, progress, the model named on the command line, the
samplers built from the arguments, images out, timing."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from ..apps.pretrained import FORMAT, MODELS, load_schedule
from ..core.schedule import Schedule
from ..models.checkpoint import describe_mismatch, extract_state_dict, infer_config
from ..models.presets import PRESETS
from ..models.unet import UNet
from ..ops import backends
from ..sampling import FastSampler, ReferenceSampler
from ..sampling.common import sample_shape
from .args import DTYPES, CLIError
from .diffusers_folder import check_not_diffusers_state, load_diffusers_folder, read_weights_file


def pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine (torch sees no GPU); use --device cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def note(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def progress_bar(args, total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=getattr(args, "quiet", False), dynamic_ncols=True, leave=False)


def set_threads(args, default: Optional[int] = None) -> None:
    n = getattr(args, "threads", None) or default
    if n:
        torch.set_num_threads(n)


def load_model(spec: str, config: Optional[str], device: torch.device, args=None) -> tuple:
    """(model in eval mode on `device`, its schedule, a description, sampler options) for
    --model / --config.

    spec: an embedded model ("digits"), a preset ("cifar10", "celeba", "lsun": random
    weights, for timing), a file: a ddim-fast pretrained file (from `ddim-fast train`)
    or a checkpoint (a state dict or the official training checkpoint) of the preset
    named by `config` (None: the structure is read off the weights), or a folder that
    diffusers' save_pretrained wrote (cli/diffusers_folder.py). Presets and checkpoints use
    the linear schedule (T = 1000). The sampler options are a diffusers scheduler's (skip,
    steps_offset, clip_x0, prediction; what --skip and --clip do not override), else {}.
    """
    if config is not None and config not in PRESETS:
        raise CLIError(f"--config {config!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    if spec in MODELS:
        if config is not None:
            raise CLIError(f"--config applies to a checkpoint file, not to the embedded model {spec!r}")
        return UNet.from_pretrained(spec).to(device), load_schedule(spec), f"embedded {spec!r}", {}
    if spec in PRESETS:
        if config is not None:
            raise CLIError(f"--config applies to a checkpoint file, not to the preset {spec!r}")
        torch.manual_seed(0)
        if args is not None:
            note(args, f"note: --model {spec} has random weights (for timing); pass a checkpoint file for real samples")
        return UNet.from_config(spec).eval().to(device), Schedule.linear(), f"preset {spec!r} (random weights)", {}
    if os.path.isdir(spec):
        if config is not None:
            raise CLIError(f"--config applies to a checkpoint file, not to the diffusers folder {spec!r} (its config.json says the structure)")
        return load_diffusers_folder(spec, device, args)
    if not os.path.isfile(spec):
        raise CLIError(f"--model {spec!r}: not a file or a folder, nor an embedded model ({', '.join(MODELS)}) or a preset ({', '.join(PRESETS)})")
    obj = read_weights_file(spec)
    if isinstance(obj, dict) and obj.get("format") == FORMAT and obj.get("kind") == "unet":
        if config is not None:
            raise CLIError(f"--config: {spec!r} is a ddim-fast pretrained file that names its own config")
        model = UNet(**obj["config"])
        model.load_state_dict(obj["state_dict"], strict=True)
        return model.eval().to(device), Schedule.from_spec(obj["schedule"]), f"file {spec!r}", {}
    try:
        state = extract_state_dict(obj, source=spec)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"--model {spec!r}: {e}") from None
    check_not_diffusers_state(spec, state)
    if config is None:
        try:
            config = infer_config(state)
        except ValueError as e:
            raise CLIError(f"--model {spec!r}: {e}; pass --config") from None
    model = UNet.from_config(config)
    problems = describe_mismatch(model, state)
    if problems:
        raise CLIError(f"--model {spec!r} does not fit {_config_name(config)}: {problems}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device), Schedule.linear(), f"checkpoint {spec!r} ({_config_name(config)})", {}


def _config_name(config) -> str:
    if isinstance(config, str):
        return config
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution")
    return "UNet(" + ", ".join(f"{k}={config[k]}" for k in keys if k in config) + ")"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), clamped and rounded."""
    return torch.round((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pil_image(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0], mode="L") if img.shape[-1] == 1 else Image.fromarray(img)


def encode_png(img: np.ndarray, f) -> None:
    """One uint8 image (H, W, C) as a PNG into the binary file f."""
    pil_image(img).save(f, format="PNG")


def image_format(path: str) -> Optional[str]:
    """The PIL format that writes path's extension (".png": "PNG"), or None when PIL cannot write it."""
    from PIL import Image

    Image.init()
    name = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    return name if name in Image.SAVE else None


def check_image_path(path: str, flag: str) -> None:
    """Refuse, before any work, an image path that cannot be written: an extension PIL cannot
    write, an existing folder, a folder in the way (a file where a parent folder should be), or
    a folder this process cannot write in."""
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; give a file name such as {os.path.join(path, 'samples.png')!r}")
    if image_format(path) is None:
        ext = os.path.splitext(path)[1]
        raise CLIError(f"{flag} {path!r}: cannot write images as {ext!r}; use .png (or .jpg, .webp, ...)" if ext else f"{flag} {path!r}: needs an image extension such as .png")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{flag} {path!r}: exists and this process cannot write it")


def check_writable_folder(folder: str, flag: str, named: Optional[str] = None) -> None:
    """folder, or its first existing ancestor, must be a folder this process can write in (the
    rest is created when written); the error names `named` (default: folder) as the user gave it."""
    named = folder if named is None else named
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CLIError(f"{flag} {named!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {named!r}: this process cannot write in {existing!r}")


GRID_MAX_IMAGES = 1024  # a grid of more is unreadable, and at 256x256 already 270 MB of pixels
GRID_MAX_PIXELS = 1 << 27


def grid_count(n: int, image_pixels: int, scale: int) -> int:
    """How many of n images go into a grid: all up to GRID_MAX_IMAGES and GRID_MAX_PIXELS (at least one)."""
    return max(1, min(n, GRID_MAX_IMAGES, GRID_MAX_PIXELS // (image_pixels * scale * scale)))


def save_grid(images: np.ndarray, path: str, *, ncol: Optional[int] = None, scale: int = 1, pad: int = 2) -> tuple[int, int]:
    """Write uint8 images (N, H, W, C) as one image grid (ncol columns, default ~sqrt(N)) in
    path's format, whole or not at all; returns (width, height)."""
    from ..apps.runs.files import write_atomic

    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 96, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    mkdir_for(path)
    image = pil_image(grid)
    write_atomic(path, lambda f: image.save(f, format=image_format(path) or "PNG"))
    return grid.shape[1], grid.shape[0]


def mkdir_for(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def write_json(path: str, result: dict) -> None:
    """A command's --json output: indented, with a final newline; says where it went."""
    mkdir_for(path)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def auto_scale(args, resolution: int) -> int:
    return args.scale if args.scale is not None else max(1, 64 // resolution)


def resolved_skip(args, options: dict):
    """--skip if given, else the model's (a diffusers scheduler's spacing), else "uniform"."""
    return args.skip if args.skip is not None else options.get("skip", "uniform")


def _sampler_kwargs(args, options: dict) -> dict:
    """The samplers' algorithm options: the command line's, where it gives them, over the
    model's own (a diffusers scheduler's: spacing, steps_offset, clip_sample, prediction)."""
    skip = resolved_skip(args, options)
    kw = dict(steps=args.steps, eta=args.eta, skip=skip, prediction=options.get("prediction", "eps"))
    if args.clip is not None:
        kw["clip_x0"] = args.clip
    else:
        kw["clip_x0"] = options.get("clip_x0", False)
    if skip == options.get("skip") and "steps_offset" in options:
        kw["steps_offset"] = options["steps_offset"]
    return kw


def fast_sampler(model, schedule, args, options=None, **over):
    backends()  # a first-use build of the native kernels happens here, not inside a timed run
    kw = _sampler_kwargs(args, options or {})
    kw.update(over)
    return FastSampler(model, schedule, cuda_graph=not getattr(args, "no_graph", False), dtype=DTYPES[getattr(args, "dtype", "fp32")], **kw)


def reference_sampler(model, schedule, args, options=None, **over):
    dtype = DTYPES[getattr(args, "dtype", "fp32")]
    ref_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    kw = _sampler_kwargs(args, options or {})
    kw.update(over)
    return ReferenceSampler(ref_model, schedule, **kw)


def image_shape(model) -> tuple:
    """(C, H, W) of the model's samples: ours (in_channels, resolution), or a diffusers UNet's config."""
    return sample_shape(model, None)


def time_run(device: torch.device, fn, *a, **kw):
    """(fn(*a, **kw), wall-clock seconds), synchronising the GPU before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    sync(device)
    return out, time.perf_counter() - t0
