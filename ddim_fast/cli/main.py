"""The parser of every command, and main(): bad arguments, and files that cannot be read or
written (a full disk included), give one line on stderr and exit code 2
(DDIM_FAST_TRACEBACK=1 shows the traceback instead)."""

from __future__ import annotations

import os
import sys

from ..models.presets import PRESETS
from . import bench, encode, quality, sample, train
from .args import CLIError, Parser


def build_parser() -> Parser:
    p = Parser(prog="ddim-fast", description="Fast DDIM sampling (Song, Meng & Ermon, ICLR 2021): sample, encode, interpolate, measure quality and speed, train.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for group in (sample, encode, quality, bench, train):  # `--help` lists them in this order
        group.add_parsers(sub)
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
    except (CLIError, ValueError, TypeError, OSError, MemoryError) as e:
        # OSError: a full disk, a folder that cannot be written, ...: its str() names the path
        if os.environ.get("DDIM_FAST_TRACEBACK") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(msg if msg.startswith("ddim-fast") else f"ddim-fast: error: {msg}", file=sys.stderr)
        return 2
