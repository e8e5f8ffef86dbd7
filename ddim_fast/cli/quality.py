"""`ddim-fast quality`: the paper's Tables 1 and 2 on the embedded digits model."""

from __future__ import annotations

import os

import torch

from ..apps.census.machine import cpu_name, git_commit
from ..apps.quality.tables import FULL, QUICK, QualitySettings, check_trends, format_tables, run_quality
from .args import CLIError, common_args, eta_arg, finite_float, nonneg_int, positive_int
from .common import image_shape, load_model, note, pick_device, set_threads, write_json


def cmd_quality(args) -> int:
    set_threads(args)
    device = pick_device(args.device)
    base = QUICK if args.quick else FULL
    over = {k: v for k, v in dict(num_samples=args.num_samples, num_reconstruct=args.num_reconstruct, batch_size=args.batch_size, seed=args.seed).items() if v is not None}
    for k in ("steps", "etas", "recon_steps"):
        v = getattr(args, k)
        if v is not None:
            over[k] = tuple(v)
    settings = QualitySettings(**{**base.__dict__, **over}).validate()
    model, schedule, desc, _ = load_model(args.model, args.config, device, args)
    shape = image_shape(model)
    if shape != (1, 16, 16):
        raise CLIError(f"--model {args.model!r}: the quality metric is for 1 x 16 x 16 digits, got {' x '.join(str(n) for n in shape)}")
    note(args, f"quality of {desc} ({'quick' if args.quick else 'full'} run): {settings.describe()}; {settings.num_reconstruct} reconstructions per S; {settings.model_calls():,} model calls on {device.type} ({torch.get_num_threads()} threads)")
    partial = sorted({n for _, _, n in settings.cells() if n % settings.batch_size})
    if partial and len({n for _, _, n in settings.cells()}) > 1:
        note(args, f"note: cells of {', '.join(map(str, partial))} samples are not whole batches of {settings.batch_size}: they share x_T with the others but not all of the step noise")
    result = run_quality(model, schedule, settings, device=device, progress=not args.quiet, log=lambda s: note(args, s))
    result["meta"].update(model=desc, mode="quick" if args.quick else "full", commit=git_commit(), cpu=cpu_name(), cpu_count=os.cpu_count())
    print(format_tables(result))
    for statement, holds in check_trends(result):
        print(f"{'[ok]  ' if holds else '[not]'} {statement}")
    print(f"took {result['meta']['seconds']['total']:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_guidance(args) -> int:
    from ..apps.quality.guidance import GuidanceSettings, format_table, run_guidance

    set_threads(args)
    device = pick_device(args.device)
    settings = GuidanceSettings(scales=tuple(args.scales), per_digit=args.per_digit, steps=args.steps, eta=args.eta, batch_size=args.batch_size, seed=args.seed).validate()
    model, schedule, desc, _ = load_model(args.model, args.config, device, args)
    if getattr(model, "null_label", None) is None:
        raise CLIError(f"--model {args.model!r} is not class-conditional; the embedded one is 'digits-cond'")
    note(args, f"guidance of {desc}: w = {', '.join(f'{w:g}' for w in settings.scales)}, {settings.per_digit} samples per digit, S = {settings.steps}, eta = {settings.eta}")
    result = run_guidance(model, schedule, settings, device=device, log=lambda s: note(args, s))
    result["meta"].update(model=desc, commit=git_commit(), cpu=cpu_name(), cpu_count=os.cpu_count())
    print(format_table(result))
    print(f"took {result['meta']['seconds']:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0


def add_parsers(sub) -> None:
    """The quality and guidance commands."""
    q = sub.add_parser("quality", help="the paper's Table 1 (FID over S x eta) and Table 2 (reconstruction) on the digits model", description="FID and KID (with its standard error) of the embedded classifier's features and its mean confidence, for S x eta, and the encode-decode reconstruction error over S. Every cell draws sample i from the same x_T and step noise. Full: 1000 samples per cell for eta 0, 0.2, 0.5, 1 and sigma-hat, 256 reconstructions (about 55 minutes on 2 CPU cores); --quick: eta 0, 1 and sigma-hat with 1000 samples at S = 10 and 20, 200 at S = 50 and 100, S = 1000 for eta 0 only on 100, 16 reconstructions (3-4 minutes on 2 cores). FID on few samples is biased upwards (see the real-data floor it prints); KID is not, and its paired differences say which gaps are more than noise.")
    common_args(q)
    q.add_argument("--quick", action="store_true", help="the paper's three rows on fewer cells and samples (see above); 3-4 minutes on 2 cores")
    q.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    q.add_argument("--num-samples", type=positive_int, default=None, help="override: samples per (S, eta) cell (>= 2)")
    q.add_argument("--num-reconstruct", type=nonneg_int, default=None, help="override: real images to encode and decode")
    q.add_argument("--batch-size", type=positive_int, default=None, help="override: images per sampler call")
    q.add_argument("--seed", type=nonneg_int, default=None, help="override: the seed (default 0)")
    q.add_argument("--steps", type=positive_int, nargs="+", default=None, help="override: S of the FID table (default 10 20 50 100 1000)")
    q.add_argument("--etas", type=eta_arg, nargs="+", default=None, help="override: eta of the FID table (default 0 0.2 0.5 1 ddpm_noisy)")
    q.add_argument("--recon-steps", type=positive_int, nargs="+", default=None, help="override: S of the reconstruction table")
    q.set_defaults(func=cmd_quality)

    gd = sub.add_parser("guidance", help="how often the class-conditional digits model draws the digit asked for, per guidance scale", description="For each guidance scale w, --per-digit samples of every digit from the class-conditional model (default the embedded 'digits-cond'), the same x_T for every w, read by the embedded digit classifier: the share read as the digit asked for and the mean confidence. w = 0: unconditional; 1: the conditional model alone.")
    common_args(gd)
    gd.set_defaults(model="digits-cond")
    gd.add_argument("--scales", type=finite_float, nargs="+", default=[0.0, 1.0, 2.0, 4.0], help="guidance scales (default 0 1 2 4)")
    gd.add_argument("--per-digit", type=positive_int, default=100, help="samples per digit and scale (default 100)")
    gd.add_argument("--steps", type=positive_int, default=50, help="S (default 50)")
    gd.add_argument("--eta", type=eta_arg, default=0.0, help="eta (default 0)")
    gd.add_argument("--batch-size", type=positive_int, default=250)
    gd.add_argument("--seed", type=nonneg_int, default=0)
    gd.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    gd.set_defaults(func=cmd_guidance)
