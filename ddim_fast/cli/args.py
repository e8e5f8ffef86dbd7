"""Argument parsing shared by every command: the parser class, value types and option groups.

Bad arguments raise CLIError, which main() prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import math

import torch

from ..core.checks import ETA_DDPM_NOISY, check_eta
from ..core.grids import SKIP_TYPES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CLIError(Exception):
    """A bad argument: main() prints it as one line and exits with code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we print one line
        raise CLIError(f"{self.prog}: error: {' '.join(message.split())}")


# --- argument types ------------------------------------------------------------------------


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def eta_arg(s: str):
    if s == ETA_DDPM_NOISY:
        return s
    try:
        return check_eta(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or {ETA_DDPM_NOISY!r}, got {s!r}") from None


def clip_arg(s: str):
    """The half-width r > 0 of the clamp, or "none": no clamp (over a diffusers folder's clip_sample)."""
    if s.lower() == "none":
        return False
    try:
        return positive_float(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected the half-width r of [-r, r], a number > 0, or 'none', got {s!r}") from None


def skip_arg(s: str):
    if s in SKIP_TYPES:
        return s
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SKIP_TYPES)} or comma-separated timesteps, got {s!r}") from None


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


# --- option groups -------------------------------------------------------------------------


def common_args(p: argparse.ArgumentParser, *, model=True, device=True) -> None:
    if model:
        p.add_argument("--model", default="digits", help="'digits' (embedded, default), a preset with random weights (cifar10, celeba, lsun), a checkpoint file, or a folder diffusers' save_pretrained wrote (a DDIMPipeline's or a UNet2DModel's)")
        p.add_argument("--config", default=None, help="the preset a checkpoint file was trained with (default: read off the weights)")
    if device:
        p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def sampling_args(p: argparse.ArgumentParser, *, eta=True, clip=True, steps_list=False) -> None:
    if steps_list:
        p.add_argument("--steps", type=positive_int, nargs="+", default=[10, 20, 50, 100, 1000], help="the S to time (default 10 20 50 100 1000)")
    else:
        p.add_argument("--steps", type=positive_int, default=50, help="S, the number of sampling steps (default 50)")
    if eta:
        p.add_argument("--eta", type=eta_arg, default=0.0, help="η in [0, 1] (0: deterministic DDIM, 1: DDPM variance) or 'ddpm_noisy' (default 0)")
    p.add_argument("--skip", type=skip_arg, default=None, help=f"timestep grid: {', '.join(SKIP_TYPES)} or comma-separated timesteps (default uniform, or a diffusers folder's spacing)")
    if clip:
        p.add_argument("--clip", type=clip_arg, nargs="?", const=1.0, default=None, metavar="R", help="clamp x̂₀ to [-R, R] (R = 1 when given alone; 'none': no clamp; default: no clamp, as the official code, or a diffusers folder's clip_sample)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="sampling dtype (default fp32)")
    p.add_argument("--no-graph", action="store_true", help="on CUDA, run the eager loop instead of a captured CUDA graph")
