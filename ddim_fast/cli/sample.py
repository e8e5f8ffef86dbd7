"""`ddim-fast sample` (a grid and/or a folder of PNGs, sharded under torchrun) and
`ddim-fast interpolate` (slerp between the x_T of two seeds)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from typing import Callable, Optional

import numpy as np
import torch

from ..apps.runs.distributed import Tally, World, finish, generate, init_world, share_from_main
from ..apps.runs.run_folder import RunFolder, RunFolderError, batches, disk_estimate, is_run_output, model_digest, schedule_digest
from ..apps.pretrained import COND_MODEL, classify_digits
from ..core.checks import describe_error
from ..sampling.noise import derive_seed, indexed_noise, slerp
from .args import DTYPES, CLIError, common_args, finite_float, nonneg_int, positive_int, sampling_args
from ..version import __version__
from .common import auto_scale, check_image_path, check_writable_folder, encode_png, fast_sampler, grid_count, image_shape, load_model, note, pick_device, progress_bar, reference_sampler, save_grid, set_threads, time_run, to_uint8


def _conditioning(args, model) -> Optional[Callable[[int, int], dict]]:
    """(start, count) -> the sample() keyword arguments of --digit / --guidance for samples
    start .. start+count-1, or None without them."""
    if args.digit is None:
        if args.guidance is not None:
            raise CLIError("--guidance needs --digit (the class to guide towards)")
        return None
    null = getattr(model, "null_label", None)
    if null is None:
        raise CLIError(f"--digit needs a class-conditional model; --model {args.model!r} is not one (the embedded one is {COND_MODEL!r})")
    if args.digit != "all" and not 0 <= args.digit < null:
        raise CLIError(f"--digit must be a class of the model, 0 to {null - 1} (or 'all'), got {args.digit}")
    device = next(model.parameters()).device

    def kwargs(start: int, count: int) -> dict:
        labels = _labels(args.digit, start, count, null).to(device)
        kw = dict(model_kwargs={"class_labels": labels})
        if args.guidance is not None:
            kw.update(guidance_scale=args.guidance, uncond_kwargs={"class_labels": torch.full_like(labels, null)})
        return kw

    return kwargs


def _labels(digit, start: int, count: int, classes: int) -> torch.Tensor:
    """The class of samples start .. start+count-1: `digit`, or with "all" sample i's i mod classes."""
    if digit == "all":
        return torch.arange(start, start + count, dtype=torch.long) % classes
    return torch.full((count,), digit, dtype=torch.long)


def digit_arg(s: str):
    if s == "all":
        return s
    try:
        return nonneg_int(s)
    except Exception:
        raise argparse.ArgumentTypeError(f"expected a digit (an int >= 0) or 'all', got {s!r}") from None


def cmd_sample(args) -> int:
    set_threads(args)
    if args.out is None and args.out_dir is None:
        args.out = "samples.png"
    _check_paths(args)  # before any work: a bad path is found in a second, not after the run
    world = _world_for(args)
    device = pick_device(args.device) if world.size == 1 or args.device == "cpu" else _rank_device(args, world)
    if args.digit is not None and args.model == "digits":  # the embedded model's class-conditional twin
        args.model = COND_MODEL
    folder = None
    try:
        model, schedule, desc, options = load_model(args.model, args.config, device, args if world.is_main else None)
        conditioning = _conditioning(args, model)
        sampler = fast_sampler(model, schedule, args, options)
        shape = image_shape(model)
        n, bs = args.num_samples, min(args.batch_size, args.num_samples)
        if args.out_dir is None:
            _check_memory(n, shape)
        else:
            folder = _open_folder(args, world, model, schedule, sampler, desc, shape, device, batch_size=bs)
        seconds = 0.0
        first_batch = None

        def sample_batch(b: int, start: int, count: int) -> np.ndarray:
            nonlocal seconds, first_batch
            x_T = indexed_noise(args.seed, start, count, shape).to(device)
            if first_batch is None:
                first_batch = x_T
            # step noise (η > 0): one stream per batch, on the sampling device (graph-safe on CUDA)
            g = torch.Generator(device=device).manual_seed(derive_seed(args.seed, 1, b))
            with _batch_memory(count, args.out_dir):
                x, dt = time_run(device, sampler.sample, x_T, generator=g, **(conditioning(start, count) if conditioning else {}))
            seconds += dt
            return to_uint8(x)

        bar = progress_bar(args if world.is_main else _Quiet(), n if world.size == 1 else -(-n // world.size), "sample", "img")
        if folder is not None:
            tally = generate(sample_batch, folder, world, encode_png=encode_png, on_batch=bar.update, log=lambda line: print(line, file=sys.stderr))
            parts = folder.images if world.is_main else None
        else:
            images = np.empty((n, shape[1], shape[2], shape[0]), np.uint8)  # filled in place: the set is held once
            for b, start, count in _batches_with(bar, n, bs):
                images[start : start + count] = sample_batch(b, start, count)
            tally = Tally(drawn=n)
            parts = lambda: iter([images])  # noqa: E731
        bar.close()
        rank_note = f", rank {world.rank} of {world.size}" if world.size > 1 else ""
        made = f"{tally.drawn} samples" if world.size == 1 else f"this rank's {tally.drawn} samples"
        per = f": {1000 * seconds / tally.drawn:.2f} ms/sample" if tally.drawn and seconds > 0 else ""
        reused = f", {tally.reused} more reused from an earlier run" if tally.reused else ""
        asked = "" if args.digit is None else f", digit {args.digit}" + ("" if args.guidance is None else f", guidance {args.guidance:g}")
        print(f"{made} in {seconds:.2f} s{per}{reused} (FastSampler, {desc}, S={args.steps}, eta={args.eta}, {_algorithm(sampler)}batch {bs}, {device.type} {args.dtype}{asked}{rank_note})")
        if parts is None:  # not rank 0 of a sharded run
            return 0
        if args.digit is not None and args.model == COND_MODEL:
            hits = _digit_hits(parts(), args.digit, model.null_label)
            what = f"a {args.digit}" if args.digit != "all" else "the digit asked for (sample i: i mod 10)"
            print(f"the digit classifier reads {hits} of {n} samples as {what} ({100 * hits / n:.1f}%)")
        if args.out:
            scale = auto_scale(args, shape[1])
            shown = grid_count(n, shape[1] * shape[2], scale)
            w, h = save_grid(_first(parts(), shown), args.out, scale=scale)
            print(f"wrote {args.out} ({w}x{h} grid of {n})" if shown == n else f"wrote {args.out} ({w}x{h} grid of the first {shown} of {n} samples: a bigger grid would not be readable)")
        if folder is not None:
            if world.size > 1:
                pngs = f"rank 0's {tally.pngs} PNGs"
            else:
                pngs = f"{tally.pngs} PNGs" + (f" (the other {n - tally.pngs} were there)" if tally.pngs < n else "")
            print(f"wrote {pngs} and samples.npz (uint8 {(n, *folder.image_hwc)}, key arr_0) to {args.out_dir}")
        if args.compare:
            _compare(model, schedule, options, sampler, first_batch if first_batch is not None else indexed_noise(args.seed, 0, min(bs, n), shape).to(device), args, device)
        return 0
    finally:
        if folder is not None:
            folder.close()  # after the grid and the digit count have read the shards
        finish(world)


def _check_paths(args) -> None:
    if args.out is not None:
        check_image_path(args.out, "--out")
    if args.out_dir is not None:
        if not args.out_dir.strip():
            raise CLIError("--out-dir must name a folder, got an empty string")
        check_writable_folder(args.out_dir, "--out-dir")  # a file there is "a file, not a folder"
        if args.out is not None and is_run_output(args.out_dir, args.out):
            raise CLIError(f"--out {args.out!r} is one of the files the run writes in --out-dir {args.out_dir!r} (a sample's PNG, a shard, samples.npz, the manifest); give the grid another name")


def _check_memory(n: int, shape: tuple) -> None:
    """Without --out-dir the samples are held in memory, as uint8."""
    needed = n * math.prod(shape)
    physical = _physical_memory()
    if physical is not None and needed > physical:
        raise CLIError(f"--num-samples {n} without --out-dir would hold {needed / 2**30:.1f} GiB of images in memory, more than this machine's {physical / 2**30:.1f} GiB; pass --out-dir DIR to write them batch by batch")


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class _batch_memory:
    """A batch that does not fit in memory: one line naming --batch-size, not an allocator traceback."""

    def __init__(self, count: int, out_dir: Optional[str]):
        self.count, self.out_dir = count, out_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _traceback):
        out_of_memory = isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
        if out_of_memory:
            where = "" if self.out_dir is None else f" (the batch size is part of the run: in another --out-dir, or {self.out_dir} with --overwrite)"
            raise CLIError(f"a batch of {self.count} samples does not fit in memory ({describe_error(error)}); lower --batch-size{where}") from None
        return False


def _open_folder(args, world, model, schedule, sampler, desc, shape, device, *, batch_size: int) -> RunFolder:
    """The run's folder, opened by rank 0 (the lock, the manifest check, the clean-up); every
    rank raises the same one-line error when rank 0 could not open it."""
    options = sampler.options
    asked = dict(
        version=__version__,
        model_sha256=model_digest(model),
        schedule_sha256=schedule_digest(schedule),
        steps=options.steps,
        eta=options.eta,
        grid=list(options.grid),
        clip=options.clip,
        prediction=options.prediction,
        use_clipped_model_output=options.use_clipped_model_output,
        dtype=args.dtype,
        device=device.type,
        seed=args.seed,
        digit=args.digit,
        guidance=args.guidance,
    )
    about = dict(model=desc, torch=torch.__version__)
    folder = RunFolder(args.out_dir, asked, num_samples=args.num_samples, batch_size=batch_size, image_shape=shape, about=about)
    refusal = None
    if world.is_main:
        try:
            folder.open(overwrite=args.overwrite, log=lambda line: note(args, line))
        except Exception as e:  # a refusal or an OSError: every rank stops with rank 0's line
            if world.size == 1:
                raise
            refusal = str(e)
    refusal = share_from_main(world, refusal)
    if refusal is not None:
        raise RunFolderError(refusal)
    if world.is_main:
        estimate, free = disk_estimate(args.num_samples, shape), shutil.disk_usage(args.out_dir).free
        if free < estimate:
            print(f"warning: --out-dir {args.out_dir} has {free / 2**30:.1f} GiB free; this run may write up to {estimate / 2**30:.1f} GiB (PNGs, shards and samples.npz)", file=sys.stderr)
    return folder


def _digit_hits(parts, digit, classes: int) -> int:
    hits, start = 0, 0
    for images in parts:
        hits += int((classify_digits(images) == _labels(digit, start, images.shape[0], classes)).sum())
        start += images.shape[0]
    return hits


def _first(parts, count: int) -> np.ndarray:
    """The first count images of a stream of batches."""
    taken, have = [], 0
    for images in parts:
        taken.append(images[: count - have])
        have += taken[-1].shape[0]
        if have == count:
            break
    return np.concatenate(taken)


class _Quiet:
    quiet = True


def _batches_with(bar, n: int, bs: int):
    for b, start, count in batches(n, bs):
        yield b, start, count
        bar.update(count)


def _world_for(args):
    """The torchrun process group when launched by torchrun (WORLD_SIZE > 1), else one process."""
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


def _algorithm(sampler) -> str:
    """The grid and what the model predicts when they are not the defaults (a diffusers folder's)."""
    o = sampler.options
    parts = [] if o.skip == "uniform" else [f"skip {o.skip}" + (f"+{o.steps_offset}" if o.steps_offset else "")]
    if o.clip is not None:
        parts.append(f"clip {o.clip[1]:g}")
    if o.prediction != "eps":
        parts.append(f"{o.prediction}-prediction")
    return "".join(f"{p}, " for p in parts)


def _compare(model, schedule, options, fast, x_T, args, device) -> None:
    """Time ReferenceSampler and FastSampler on one batch (one warm-up run each, then one timed run)."""
    ref = reference_sampler(model, schedule, args, options)
    x_ref = x_T.to(DTYPES[args.dtype])
    gen = lambda: torch.Generator(device=device).manual_seed(derive_seed(args.seed, 1, 0))  # noqa: E731
    note(args, f"timing ReferenceSampler vs FastSampler on a batch of {x_T.shape[0]} (one warm-up run each)")
    ref.sample(x_ref, generator=gen())
    _, t_ref = time_run(device, ref.sample, x_ref, generator=gen())
    fast.sample(x_T, generator=gen())
    _, t_fast = time_run(device, fast.sample, x_T, generator=gen())
    n = x_T.shape[0]
    print(f"reference {1000 * t_ref / n:.2f} ms/sample, fast {1000 * t_fast / n:.2f} ms/sample ({t_ref / t_fast:.2f}x)")


def cmd_interpolate(args) -> int:
    set_threads(args)
    check_image_path(args.out, "--out")
    device = pick_device(args.device)
    model, schedule, desc, options = load_model(args.model, args.config, device, args)
    shape = image_shape(model)
    a, b = (indexed_noise(s, 0, 1, shape)[0] for s in args.seeds)  # sample 0 of each seed
    alphas = [i / (args.frames - 1) for i in range(args.frames)]
    x_T = torch.stack([slerp(a, b, al) for al in alphas]).to(device)
    args.eta = 0.0
    sampler = fast_sampler(model, schedule, args, options)
    out = []
    bar = progress_bar(args, args.frames, "interpolate", "img")
    for i in range(0, args.frames, args.batch_size):
        out.append(to_uint8(sampler.sample(x_T[i : i + args.batch_size])))
        bar.update(min(args.batch_size, args.frames - i))
    bar.close()
    w, h = save_grid(np.concatenate(out), args.out, ncol=args.frames, scale=auto_scale(args, shape[1]))
    print(f"wrote {args.out} ({w}x{h}): {args.frames} frames from seed {args.seeds[0]} to seed {args.seeds[1]} (slerp of x_T, S={args.steps}, eta=0, {desc})")
    return 0


def add_parsers(sub) -> None:
    """The sample and interpolate commands."""
    s = sub.add_parser("sample", help="draw samples to a grid PNG and/or a folder of PNGs + samples.npz", description="Draw samples with FastSampler. Sample i's x_T depends only on (--seed, i), so with eta=0 the same --seed gives the same images whatever --batch-size (with eta > 0 the step noise is drawn per batch).")
    common_args(s)
    sampling_args(s)
    s.add_argument("--num-samples", type=positive_int, default=64, help="how many samples (default 64)")
    s.add_argument("--batch-size", type=positive_int, default=64, help="samples per sampler call (default 64)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="sample i's x_T comes from (seed, i) (default 0)")
    s.add_argument("--out", default=None, metavar="PNG", help="an image grid (default samples.png when --out-dir is not given)")
    s.add_argument("--out-dir", default=None, metavar="DIR", help="one PNG per sample (000000.png, ...) and samples.npz (uint8 NHWC, key arr_0, for FID tools)")
    s.add_argument("--scale", type=positive_int, default=None, help="enlarge the grid by this integer factor (default: to at least 64 px per image)")
    s.add_argument("--overwrite", action="store_true", help="with --out-dir: start over, removing what an earlier run wrote there (its shards, PNGs, samples.npz and manifest; nothing else), where by default a folder of another run's settings is refused")
    s.add_argument("--compare", action="store_true", help="also time ReferenceSampler vs FastSampler on the first batch")
    s.add_argument("--digit", type=digit_arg, default=None, metavar="D", help=f"draw the digit D (or 'all': sample i draws i mod 10) with the class-conditional model ({COND_MODEL!r} for the embedded one), and say how many samples the digit classifier reads as asked")
    s.add_argument("--guidance", type=finite_float, default=None, metavar="W", help="with --digit: classifier-free guidance scale (eps_u + W (eps_c - eps_u), one model call on the doubled batch; default: none, the conditional model alone)")
    s.set_defaults(func=cmd_sample)

    it = sub.add_parser("interpolate", help="slerp between the x_T of two seeds, as a row of frames", description="Spherical interpolation between sample 0 of --seeds A and of B (the x_T that `sample --seed A` starts its first image from), sampled with eta = 0.")
    common_args(it)
    sampling_args(it, eta=False)
    it.add_argument("--seeds", type=nonneg_int, nargs=2, default=[0, 1], metavar=("A", "B"), help="the two seeds (default 0 1)")
    it.add_argument("--frames", type=positive_int, default=8, help="frames, ends included (default 8; at least 2)")
    it.add_argument("--batch-size", type=positive_int, default=64)
    it.add_argument("--scale", type=positive_int, default=None, help="enlarge the grid by this integer factor (default: to at least 64 px per image)")
    it.add_argument("--out", default="interpolation.png", help="the PNG to write (default interpolation.png)")
    it.set_defaults(func=cmd_interpolate)
