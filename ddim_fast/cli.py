"""The `ddim-fast` command line (also `python -m ddim_fast.cli`).

    ddim-fast sample --out grid.png                 # 64 digits from the embedded model
    ddim-fast sample --steps 20 --compare           # and time ReferenceSampler vs FastSampler
    ddim-fast encode --input digits --out latents.npz
    ddim-fast interpolate --seeds 0 1 --frames 8 --out interp.png
    ddim-fast quality --quick --json quality.json   # the paper's Tables 1 and 2 in shape
    ddim-fast bench --batch-size 16                 # reference vs fast over S
    ddim-fast train --out digits.pt                 # retrain the embedded model

Bad arguments give one line on stderr and exit code 2 (DDIM_FAST_TRACEBACK=1 shows the
traceback instead); progress bars go to stderr and --quiet turns them off.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from typing import Optional

import numpy as np
import torch

from ._machine import cpu_name, git_commit
from ._validate import ETA_DDPM_NOISY, check_eta
from .schedule import SKIP_TYPES, Schedule
from .unet import PRESETS, UNet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CLIError(Exception):
    """A bad argument: main() prints it as one line and exits with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we print one line
        raise CLIError(f"{self.prog}: error: {' '.join(message.split())}")


# --- argument types ------------------------------------------------------------------------


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _eta(s: str):
    if s == ETA_DDPM_NOISY:
        return s
    try:
        return check_eta(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or {ETA_DDPM_NOISY!r}, got {s!r}") from None


def _clip(s: str) -> float:
    try:
        return _float_pos(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected the half-width r of [-r, r], a number > 0, got {s!r}") from None


def _skip(s: str):
    if s in SKIP_TYPES:
        return s
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SKIP_TYPES)} or comma-separated timesteps, got {s!r}") from None


def _float_pos(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


# --- shared set-up ---------------------------------------------------------------------------


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine (torch sees no GPU); use --device cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _note(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def _bar(args, total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=getattr(args, "quiet", False), dynamic_ncols=True, leave=False)


def _set_threads(args, default: Optional[int] = None) -> None:
    n = getattr(args, "threads", None) or default
    if n:
        torch.set_num_threads(n)


def load_model(spec: str, config: Optional[str], device: torch.device, args=None) -> tuple[UNet, Schedule, str]:
    """(model in eval mode on `device`, its schedule, a description) for --model / --config.

    spec: an embedded model ("digits"), a preset ("cifar10", "celeba", "lsun": random
    weights, for timing), or a file: a ddim-fast pretrained file (from `ddim-fast train`)
    or a checkpoint (a state dict or the official training checkpoint) of the preset
    named by `config` (None: the structure is read off the weights). Presets and checkpoints use the linear schedule (T = 1000).
    """
    from .pretrained import MODELS, load_pretrained, load_schedule

    if config is not None and config not in PRESETS:
        raise CLIError(f"--config {config!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    if spec in MODELS:
        if config is not None:
            raise CLIError(f"--config applies to a checkpoint file, not to the embedded model {spec!r}")
        return load_pretrained(spec).to(device), load_schedule(spec), f"embedded {spec!r}"
    if spec in PRESETS:
        if config is not None:
            raise CLIError(f"--config applies to a checkpoint file, not to the preset {spec!r}")
        torch.manual_seed(0)
        if args is not None:
            _note(args, f"note: --model {spec} has random weights (for timing); pass a checkpoint file for real samples")
        return UNet.from_config(spec).eval().to(device), Schedule.linear(), f"preset {spec!r} (random weights)"
    if not os.path.isfile(spec):
        raise CLIError(f"--model {spec!r}: not a file, nor an embedded model ({', '.join(MODELS)}) or a preset ({', '.join(PRESETS)})")
    from .checkpoint import extract_state_dict
    from .pretrained import FORMAT
    from .train import schedule_from_spec

    try:
        obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad argument here
        raise CLIError(f"--model {spec!r}: cannot read it as a torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT and obj.get("kind") == "unet":
        if config is not None:
            raise CLIError(f"--config: {spec!r} is a ddim-fast pretrained file that names its own config")
        model = UNet(**obj["config"])
        model.load_state_dict(obj["state_dict"], strict=True)
        return model.eval().to(device), schedule_from_spec(obj["schedule"]), f"file {spec!r}"
    from .checkpoint import describe_mismatch, infer_config

    try:
        state = extract_state_dict(obj, source=spec)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"--model {spec!r}: {e}") from None
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
    return model.eval().to(device), Schedule.linear(), f"checkpoint {spec!r} ({_config_name(config)})"


def _config_name(config) -> str:
    if isinstance(config, str):
        return config
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution")
    return "UNet(" + ", ".join(f"{k}={config[k]}" for k in keys if k in config) + ")"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), clamped and rounded."""
    return torch.round((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0], mode="L") if img.shape[-1] == 1 else Image.fromarray(img)


def save_grid(images: np.ndarray, path: str, *, ncol: Optional[int] = None, scale: int = 1, pad: int = 2) -> tuple[int, int]:
    """Write uint8 images (N, H, W, C) as one PNG grid (ncol columns, default ~sqrt(N)); returns (width, height)."""
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 96, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    _mkdir_for(path)
    _pil(grid).save(path)
    return grid.shape[1], grid.shape[0]


def _mkdir_for(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _auto_scale(args, resolution: int) -> int:
    return args.scale if args.scale is not None else max(1, 64 // resolution)


def _sampler_kwargs(args) -> dict:
    return dict(steps=args.steps, eta=args.eta, skip=args.skip, clip_x0=False if args.clip is None else args.clip)


def _fast_sampler(model, schedule, args, **over):
    from .fast import FastSampler

    kw = _sampler_kwargs(args)
    kw.update(over)
    return FastSampler(model, schedule, cuda_graph=not getattr(args, "no_graph", False), dtype=DTYPES[getattr(args, "dtype", "fp32")], **kw)


def _reference_sampler(model, schedule, args, **over):
    from .reference import ReferenceSampler

    dtype = DTYPES[getattr(args, "dtype", "fp32")]
    ref_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    kw = _sampler_kwargs(args)
    kw.update(over)
    return ReferenceSampler(ref_model, schedule, **kw)


def _time_run(device: torch.device, fn, *a, **kw):
    """(fn(*a, **kw), wall-clock seconds), synchronising the GPU before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    _sync(device)
    return out, time.perf_counter() - t0


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two x_T of the same shape (as the DDIM paper's Sec. 5.3).

    θ = arccos(<a, b> / (|a| |b|)); slerp = sin((1 - α) θ) / sin θ · a + sin(α θ) / sin θ · b.
    """
    cos = float((a.flatten().double() @ b.flatten().double()) / (a.double().norm() * b.double().norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-6:
        return (1 - alpha) * a + alpha * b
    return (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)


# --- sample ------------------------------------------------------------------------------------


def cmd_sample(args) -> int:
    from .quality import derive_seed, indexed_noise

    _set_threads(args)
    world = _world_for(args)
    device = _device(args.device) if world.size == 1 or args.device == "cpu" else _rank_device(args, world)
    try:
        model, schedule, desc = load_model(args.model, args.config, device, args if world.is_main else None)
        if args.out is None and args.out_dir is None:
            args.out = "samples.png"
        sampler = _fast_sampler(model, schedule, args)
        shape = (model.in_channels, model.resolution, model.resolution)
        n, bs = args.num_samples, args.batch_size
        seconds = 0.0
        first_batch = None

        def sample_batch(b: int, start: int, count: int) -> np.ndarray:
            nonlocal seconds, first_batch
            x_T = indexed_noise(args.seed, start, count, shape).to(device)
            if first_batch is None:
                first_batch = x_T
            # step noise (η > 0): one stream per batch, on the sampling device (graph-safe on CUDA)
            g = torch.Generator(device=device).manual_seed(derive_seed(args.seed, 1, b))
            x, dt = _time_run(device, sampler.sample, x_T, generator=g)
            seconds += dt
            return to_uint8(x)

        bar = _bar(args if world.is_main else _Quiet(), n if world.size == 1 else -(-n // world.size), "sample", "img")
        if args.out_dir:
            from .distributed import generate

            images = generate(sample_batch, n, bs, args.out_dir, world, write_png=lambda img, path: _pil(img).save(path), on_batch=bar.update)
        else:
            images = np.concatenate([sample_batch(b, start, count) for b, start, count in _batches_with(bar, n, bs)])
        bar.close()
    finally:
        from .distributed import finish

        finish(world)
    rank_note = f", rank {world.rank} of {world.size}" if world.size > 1 else ""
    made = f"{n} samples" if world.size == 1 else "this rank's samples"
    per = f": {1000 * seconds / n:.2f} ms/sample" if world.size == 1 and seconds > 0 else ""
    print(f"{made} in {seconds:.2f} s{per} (FastSampler, {desc}, S={args.steps}, eta={args.eta}, batch {bs}, {device.type} {args.dtype}{rank_note})")
    if images is None:  # not rank 0 of a sharded run
        return 0
    if args.out:
        w, h = save_grid(images, args.out, scale=_auto_scale(args, model.resolution))
        print(f"wrote {args.out} ({w}x{h} grid of {n})")
    if args.out_dir:
        print(f"wrote {n} PNGs and samples.npz (uint8 {tuple(images.shape)}, key arr_0) to {args.out_dir}")
    if args.compare:
        _compare(model, schedule, sampler, first_batch if first_batch is not None else indexed_noise(args.seed, 0, min(bs, n), shape).to(device), args, device)
    return 0


class _Quiet:
    quiet = True


def _batches_with(bar, n: int, bs: int):
    from .distributed import batches

    for b, start, count in batches(n, bs):
        yield b, start, count
        bar.update(count)


def _world_for(args):
    """The torchrun process group when launched by torchrun (WORLD_SIZE > 1), else one process."""
    from .distributed import World, init_world

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(0, 1, 0, False)
    if args.out_dir is None:
        raise CLIError("sample under torchrun needs --out-dir (each rank writes shards there; rank 0 merges them)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine (torch sees no GPU); use --device cpu")
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    return init_world("cuda" if use_cuda else "cpu")


def _rank_device(args, world) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise CLIError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", world.local_rank)


def _compare(model, schedule, fast, x_T, args, device) -> None:
    """Time ReferenceSampler and FastSampler on one batch (one warm-up run each, then one timed run)."""
    from .quality import derive_seed

    ref = _reference_sampler(model, schedule, args)
    x_ref = x_T.to(DTYPES[args.dtype])
    gen = lambda: torch.Generator(device=device).manual_seed(derive_seed(args.seed, 1, 0))  # noqa: E731
    _note(args, f"timing ReferenceSampler vs FastSampler on a batch of {x_T.shape[0]} (one warm-up run each)")
    ref.sample(x_ref, generator=gen())
    _, t_ref = _time_run(device, ref.sample, x_ref, generator=gen())
    fast.sample(x_T, generator=gen())
    _, t_fast = _time_run(device, fast.sample, x_T, generator=gen())
    n = x_T.shape[0]
    print(f"reference {1000 * t_ref / n:.2f} ms/sample, fast {1000 * t_fast / n:.2f} ms/sample ({t_ref / t_fast:.2f}x)")


# --- encode ---------------------------------------------------------------------------------------


def _read_images(spec: str, model: UNet, limit: Optional[int]) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """(images (N, C, H, W) in [-1, 1], labels or None) from --input."""
    c, r = model.in_channels, model.resolution
    labels = None
    if spec == "digits":
        from .data import load_digits

        x, y = load_digits()
        x, labels = x, y.numpy()
    elif os.path.isdir(spec) or spec.lower().endswith(".png"):
        from PIL import Image

        files = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(".png")) if os.path.isdir(spec) else [spec]
        if not files:
            raise CLIError(f"--input {spec!r}: no .png files in that folder")
        if not all(os.path.isfile(f) for f in files):
            raise CLIError(f"--input {spec!r}: no such file")
        arr = np.stack([np.asarray(Image.open(f).convert("L" if c == 1 else "RGB")) for f in files[:limit]])
        x = _uint8_to_tensor(arr if arr.ndim == 4 else arr[..., None], spec)
    elif spec.lower().endswith(".npz"):
        if not os.path.isfile(spec):
            raise CLIError(f"--input {spec!r}: no such file")
        with np.load(spec) as f:
            key = "arr_0" if "arr_0" in f.files else "images" if "images" in f.files else None
            if key is None:
                raise CLIError(f"--input {spec!r}: expected an array 'arr_0' (uint8 N,H,W,C, as `sample --out-dir` writes) or 'images'")
            arr = f[key]
        if arr.ndim == 3:
            arr = arr[..., None]
        x = _uint8_to_tensor(arr, spec)
    else:
        raise CLIError(f"--input {spec!r}: expected 'digits' (the embedded data), a .npz, a .png or a folder of .png files")
    if limit is not None:
        x = x[:limit]
        labels = None if labels is None else labels[:limit]
    if tuple(x.shape[1:]) != (c, r, r):
        raise CLIError(f"--input {spec!r}: images are {tuple(x.shape[1:])} (C, H, W) but the model takes ({c}, {r}, {r}); resize them first")
    return x, labels


def _uint8_to_tensor(arr: np.ndarray, spec: str) -> torch.Tensor:
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise CLIError(f"--input {spec!r}: expected uint8 images (N, H, W, C), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def cmd_encode(args) -> int:
    _set_threads(args)
    device = _device(args.device)
    model, schedule, desc = load_model(args.model, args.config, device, args)
    x, labels = _read_images(args.input, model, args.num_samples)
    args.eta, args.clip = 0.0, None
    sampler = _fast_sampler(model, schedule, args)
    latents, se = [], 0.0
    bar = _bar(args, x.shape[0], "encode", "img")
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], args.batch_size):
        xb = x[i : i + args.batch_size].to(device)
        z = sampler.encode(xb)
        latents.append(z.float().cpu())
        if args.reconstruct:
            se += (((sampler.sample(z).float() - xb) / 2) ** 2).sum().item()
        bar.update(xb.shape[0])
    bar.close()
    latents = torch.cat(latents)
    extra = {} if labels is None else {"labels": labels}
    _mkdir_for(args.out)
    np.savez_compressed(args.out, latents=latents.numpy(), steps=np.int64(args.steps), skip=np.array(str(args.skip)), **extra)
    print(f"encoded {x.shape[0]} images with S={args.steps} ({desc}) in {time.perf_counter() - t0:.2f} s; wrote {args.out} (latents {tuple(latents.shape)} float32)")
    if args.reconstruct:
        print(f"reconstruction (encode then decode, S={args.steps} each way): MSE per dimension on the [0, 1] scale {se / x.numel():.3e}")
    return 0


# --- interpolate ----------------------------------------------------------------------------------


def cmd_interpolate(args) -> int:
    from .quality import indexed_noise

    _set_threads(args)
    device = _device(args.device)
    model, schedule, desc = load_model(args.model, args.config, device, args)
    shape = (model.in_channels, model.resolution, model.resolution)
    a, b = (indexed_noise(s, 0, 1, shape)[0] for s in args.seeds)  # sample 0 of each seed
    alphas = [i / (args.frames - 1) for i in range(args.frames)]
    x_T = torch.stack([slerp(a, b, al) for al in alphas]).to(device)
    args.eta = 0.0
    sampler = _fast_sampler(model, schedule, args)
    out = []
    bar = _bar(args, args.frames, "interpolate", "img")
    for i in range(0, args.frames, args.batch_size):
        out.append(to_uint8(sampler.sample(x_T[i : i + args.batch_size])))
        bar.update(min(args.batch_size, args.frames - i))
    bar.close()
    w, h = save_grid(np.concatenate(out), args.out, ncol=args.frames, scale=_auto_scale(args, model.resolution))
    print(f"wrote {args.out} ({w}x{h}): {args.frames} frames from seed {args.seeds[0]} to seed {args.seeds[1]} (slerp of x_T, S={args.steps}, eta=0, {desc})")
    return 0


# --- quality -----------------------------------------------------------------------------------------


def cmd_quality(args) -> int:
    import json

    from .quality import FULL, QUICK, QualitySettings, check_trends, format_tables, run_quality

    _set_threads(args)
    device = _device(args.device)
    base = QUICK if args.quick else FULL
    over = {k: v for k, v in dict(num_samples=args.num_samples, num_reconstruct=args.num_reconstruct, batch_size=args.batch_size, seed=args.seed).items() if v is not None}
    for k in ("steps", "etas", "recon_steps"):
        v = getattr(args, k)
        if v is not None:
            over[k] = tuple(v)
    settings = QualitySettings(**{**base.__dict__, **over}).validate()
    model, schedule, desc = load_model(args.model, args.config, device, args)
    if (model.in_channels, model.resolution) != (1, 16):
        raise CLIError(f"--model {args.model!r}: the quality metric is for 1 x 16 x 16 digits, got {model.in_channels} x {model.resolution} x {model.resolution}")
    _note(args, f"quality of {desc}: {settings.num_samples} samples per (S, eta) cell, {settings.num_reconstruct} reconstructions, {settings.model_calls():,} model calls on {device.type} ({torch.get_num_threads()} threads)")
    result = run_quality(model, schedule, settings, device=device, progress=not args.quiet, log=lambda s: _note(args, s))
    result["meta"].update(model=desc, mode="quick" if args.quick else "full", commit=git_commit(), cpu=cpu_name(), cpu_count=os.cpu_count())
    print(format_tables(result))
    for statement, holds in check_trends(result):
        print(f"{'[ok]  ' if holds else '[not]'} {statement}")
    print(f"took {result['meta']['seconds']['total']:.0f} s")
    if args.json:
        _mkdir_for(args.json)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    from .quality import indexed_noise

    _set_threads(args)
    device = _device(args.device)
    model, schedule, desc = load_model(args.model, args.config, device, args)
    shape = (model.in_channels, model.resolution, model.resolution)
    x_T = indexed_noise(args.seed, 0, args.batch_size, shape).to(device)
    x_ref = x_T.to(DTYPES[args.dtype])
    rows = []
    runs_per = args.warmup + args.repeats
    bar = _bar(args, 2 * runs_per * sum(args.steps), "bench", "step")
    for steps in args.steps:
        times = {}
        for name, sampler, x in (("reference", _reference_sampler(model, schedule, args, steps=steps), x_ref), ("fast", _fast_sampler(model, schedule, args, steps=steps), x_T)):
            ts = []
            for r in range(runs_per):
                g = torch.Generator(device=device).manual_seed(args.seed)
                _, t = _time_run(device, sampler.sample, x, generator=g)
                if r >= args.warmup:
                    ts.append(t)
                bar.update(steps)
            times[name] = statistics.median(ts)
        rows.append((steps, times["reference"], times["fast"]))
    bar.close()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"{desc}, batch {args.batch_size}, eta {args.eta}, {device.type} {args.dtype}" + (f" ({threads} threads)" if threads else "") + f", torch {torch.__version__}; median of {args.repeats} runs after {args.warmup} warm-up")
    print()
    print("| S | reference ms | fast ms | fast/reference | speed-up |")
    print("|---|---|---|---|---|")
    for steps, r, f in rows:
        print(f"| {steps} | {1000 * r:.1f} | {1000 * f:.1f} | {f / r:.3f} | {r / f:.2f}x |")
    return 0


# --- train -------------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from tqdm import tqdm

    from .train import ClassifierConfig, TrainConfig, train_classifier, train_diffusion

    log = (lambda s: tqdm.write(s)) if not args.quiet else None  # noqa: E731
    threads = args.threads or 1
    if args.classifier:
        out = args.out or "digits_classifier.pt"
        cfg = ClassifierConfig(seed=args.seed, num_threads=threads, **({"epochs": args.epochs} if args.epochs else {}), **({"lr": args.lr} if args.lr else {}))
        _model, acc = train_classifier(cfg, out=out, log=log)
        print(f"classifier: validation accuracy {acc:.4f}; wrote {out}")
        return 0
    out = args.out or "digits.pt"
    fields = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay)
    cfg = TrainConfig(seed=args.seed, num_threads=threads, **{k: v for k, v in fields.items() if v is not None}).validate()
    t0 = time.perf_counter()
    _ema, history = train_diffusion(cfg, out=out, checkpoint=args.checkpoint, log=log, log_every=args.log_every, progress=not args.quiet)
    final = history[-1][1] if history else float("nan")
    print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.0f} s on {threads} thread(s); final loss {final:.5f}; wrote {out}")
    return 0


# --- the parser ---------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, model=True, device=True) -> None:
    if model:
        p.add_argument("--model", default="digits", help="'digits' (embedded, default), a preset with random weights (cifar10, celeba, lsun), or a checkpoint file")
        p.add_argument("--config", default=None, help="the preset a checkpoint file was trained with (default: read off the weights)")
    if device:
        p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def _sampling_args(p: argparse.ArgumentParser, *, eta=True, clip=True, steps_list=False) -> None:
    if steps_list:
        p.add_argument("--steps", type=_positive_int, nargs="+", default=[10, 20, 50, 100, 1000], help="the S to time (default 10 20 50 100 1000)")
    else:
        p.add_argument("--steps", type=_positive_int, default=50, help="S, the number of sampling steps (default 50)")
    if eta:
        p.add_argument("--eta", type=_eta, default=0.0, help="η in [0, 1] (0: deterministic DDIM, 1: DDPM variance) or 'ddpm_noisy' (default 0)")
    p.add_argument("--skip", type=_skip, default="uniform", help=f"timestep grid: {', '.join(SKIP_TYPES)} or comma-separated timesteps (default uniform)")
    if clip:
        p.add_argument("--clip", type=_clip, nargs="?", const=1.0, default=None, metavar="R", help="clamp x̂₀ to [-R, R] (R = 1 when given alone; default: no clamp, as the official code)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="sampling dtype (default fp32)")
    p.add_argument("--no-graph", action="store_true", help="on CUDA, run the eager loop instead of a captured CUDA graph")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddim-fast", description="Fast DDIM sampling (Song, Meng & Ermon, ICLR 2021): sample, encode, interpolate, measure quality and speed, train.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("sample", help="draw samples to a grid PNG and/or a folder of PNGs + samples.npz", description="Draw samples with FastSampler. Sample i's x_T depends only on (--seed, i), so with eta=0 the same --seed gives the same images whatever --batch-size (with eta > 0 the step noise is drawn per batch).")
    _common(s)
    _sampling_args(s)
    s.add_argument("--num-samples", type=_positive_int, default=64, help="how many samples (default 64)")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="samples per sampler call (default 64)")
    s.add_argument("--seed", type=_nonneg_int, default=0, help="sample i's x_T comes from (seed, i) (default 0)")
    s.add_argument("--out", default=None, metavar="PNG", help="an image grid (default samples.png when --out-dir is not given)")
    s.add_argument("--out-dir", default=None, metavar="DIR", help="one PNG per sample (000000.png, ...) and samples.npz (uint8 NHWC, key arr_0, for FID tools)")
    s.add_argument("--scale", type=_positive_int, default=None, help="enlarge the grid by this integer factor (default: to at least 64 px per image)")
    s.add_argument("--compare", action="store_true", help="also time ReferenceSampler vs FastSampler on the first batch")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("encode", help="DDIM inversion: images -> latents x_T (.npz)", description="Encode images to x_T with the deterministic (eta = 0) DDIM ODE run forward.")
    _common(e)
    _sampling_args(e, eta=False, clip=False)
    e.add_argument("--input", default="digits", help="'digits' (the embedded data, default), a .npz (arr_0 uint8 NHWC, as `sample --out-dir` writes), a .png or a folder of .png files")
    e.add_argument("--num-samples", type=_positive_int, default=None, help="encode only the first N images")
    e.add_argument("--batch-size", type=_positive_int, default=256, help="images per sampler call (default 256)")
    e.add_argument("--out", default="latents.npz", help="where to write the latents (key 'latents', float32 NCHW; default latents.npz)")
    e.add_argument("--reconstruct", action="store_true", help="also decode the latents and print the reconstruction MSE")
    e.set_defaults(func=cmd_encode)

    it = sub.add_parser("interpolate", help="slerp between the x_T of two seeds, as a row of frames", description="Spherical interpolation between sample 0 of --seeds A and of B (the x_T that `sample --seed A` starts its first image from), sampled with eta = 0.")
    _common(it)
    _sampling_args(it, eta=False)
    it.add_argument("--seeds", type=_nonneg_int, nargs=2, default=[0, 1], metavar=("A", "B"), help="the two seeds (default 0 1)")
    it.add_argument("--frames", type=_positive_int, default=8, help="frames, ends included (default 8; at least 2)")
    it.add_argument("--batch-size", type=_positive_int, default=64)
    it.add_argument("--scale", type=_positive_int, default=None, help="enlarge the grid by this integer factor (default: to at least 64 px per image)")
    it.add_argument("--out", default="interpolation.png", help="the PNG to write (default interpolation.png)")
    it.set_defaults(func=cmd_interpolate)

    q = sub.add_parser("quality", help="the paper's Table 1 (FID over S x eta) and Table 2 (reconstruction) on the digits model", description="FID of the embedded classifier's features and its mean confidence, for S x eta, and the encode-decode reconstruction error over S. Full: 1000 samples per cell, 256 reconstructions (about 55 minutes on 2 CPU cores); --quick: 250 and 50 (about 12 minutes). FID on few samples is noisy and biased upwards: compare cells of one run, and see the real-data floor it prints.")
    _common(q)
    q.add_argument("--quick", action="store_true", help="fewer samples: 250 per cell, 50 reconstructions")
    q.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    q.add_argument("--num-samples", type=_positive_int, default=None, help="override: samples per (S, eta) cell (>= 2)")
    q.add_argument("--num-reconstruct", type=_nonneg_int, default=None, help="override: real images to encode and decode")
    q.add_argument("--batch-size", type=_positive_int, default=None, help="override: images per sampler call")
    q.add_argument("--seed", type=_nonneg_int, default=None, help="override: the seed (default 0)")
    q.add_argument("--steps", type=_positive_int, nargs="+", default=None, help="override: S of the FID table (default 10 20 50 100 1000)")
    q.add_argument("--etas", type=_eta, nargs="+", default=None, help="override: eta of the FID table (default 0 0.2 0.5 1 ddpm_noisy)")
    q.add_argument("--recon-steps", type=_positive_int, nargs="+", default=None, help="override: S of the reconstruction table")
    q.set_defaults(func=cmd_quality)

    b = sub.add_parser("bench", help="reference vs fast sampler: median ms per run over S", description="Time ReferenceSampler and FastSampler on one batch for each S; prints a markdown table.")
    _common(b)
    _sampling_args(b, steps_list=True)
    b.add_argument("--batch-size", type=_positive_int, default=16, help="images per run (default 16)")
    b.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per cell (default 3)")
    b.add_argument("--warmup", type=_nonneg_int, default=1, help="untimed runs first (default 1)")
    b.add_argument("--seed", type=_nonneg_int, default=0)
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train the digits UNet (or, with --classifier, the quality classifier)", description="L_simple with EMA on the 16x16 digits, on --threads CPU threads (default 1); the embedded model is the default settings.")
    _common(t, model=False, device=False)
    t.add_argument("--classifier", action="store_true", help="train the digit classifier of the quality metric instead")
    t.add_argument("--out", default=None, help="where to save (default digits.pt, or digits_classifier.pt)")
    t.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps (default 8000)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="default 128")
    t.add_argument("--lr", type=_float_pos, default=None, help="peak learning rate (default 5e-4; classifier 1e-3)")
    t.add_argument("--ema-decay", type=float, default=None, help="default 0.999")
    t.add_argument("--epochs", type=_positive_int, default=None, help="classifier epochs (default 40)")
    t.add_argument("--seed", type=_nonneg_int, default=0)
    t.add_argument("--checkpoint", default=None, help="resumable checkpoint file: written during training, resumed from when it exists")
    t.add_argument("--log-every", type=_positive_int, default=100, help="steps between log lines (default 100)")
    t.set_defaults(func=cmd_train)
    return p


def _check_args(args) -> None:
    """Checks argparse cannot express."""
    if getattr(args, "command", None) == "interpolate" and args.frames < 2:
        raise CLIError(f"ddim-fast interpolate: error: --frames must be at least 2, got {args.frames}")
    if getattr(args, "config", None) is not None and args.config not in PRESETS:
        raise CLIError(f"ddim-fast {args.command}: error: --config {args.config!r}: unknown preset; expected one of {', '.join(PRESETS)}")


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0, or 2 for a bad argument)."""
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        return args.func(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("ddim-fast: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("DDIM_FAST_TRACEBACK") == "1":
            raise
        msg = " ".join(str(e).split())
        print(msg if msg.startswith("ddim-fast") else f"ddim-fast: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
